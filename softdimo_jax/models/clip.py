"""CLIP (image tower + text tower + projections + logit scale) as one Flax linen module.

One network serves OpenCLIP's `CLIP` (CLIP score with ViT-L-14, HPS v2 = a fine-tuned
ViT-H-14) and Hugging Face's `CLIPModel` (PickScore, CLIP-H): the two agree layer for layer
(pre-LN blocks, q/k/v projections with biases — packed in OpenCLIP, separate in HF —, LN eps
1e-5, patch conv without bias, class token first, LN before the blocks, LN on the class
token, bias-free projections). Only the key names differ; `conversion/clip.py` maps both.

- image tower (`ClipVisionTransformer`): NHWC images already resized and normalised (see
  `models/image_preprocess.py`) → patch conv → [class; patches] + positions → `ln_pre` →
  blocks → `ln_post` of the class token → `@ proj` (B, E);
- text tower: `models/clip_text.ClipTextTransformer` (the same module MaskGen's condition
  uses), pooled at the end token (argmax of ids) and projected (B, E); `variable_length` and
  the padding `attention_mask` are HF's conventions;
- `logit_scale` stored as a log, as both originals.

Activation: exact erf GELU (HPS v2, PickScore, LAION weights) or QuickGELU (OpenAI weights).
Scores (`hps_score`, `pickscore`, `clip_logits`) are free functions of the features.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from softdimo_jax.models.clip_text import ClipTextTransformer, ResidualAttentionBlock, layer_norm


class ClipVisionTransformer(nn.Module):
    """OpenCLIP `VisionTransformer` / HF `CLIPVisionTransformer` + projection (pool = class token)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_ratio: float = 4.0
    embed_dim: int = 1024
    quick_gelu: bool = False
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @nn.compact
    def __call__(self, images):
        """images (B, S, S, 3) normalised, S = image_size → (B, E) unnormalised features."""
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"CLIP image tower expects (B, {self.image_size}, {self.image_size}, 3) preprocessed images,"
                f" got {tuple(images.shape)} — run models.image_preprocess.clip_preprocess first"
            )
        w, g = self.width, self.grid_size
        x = nn.Conv(w, (self.patch_size, self.patch_size), strides=self.patch_size, padding="VALID",
                    use_bias=False, dtype=self.dtype, name="conv1")(images.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, g * g, w)
        cls = self.param("class_embedding", nn.initializers.normal(w ** -0.5), (w,))
        pos = self.param("positional_embedding", nn.initializers.normal(w ** -0.5), (g * g + 1, w))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, w)), x], axis=1)
        x = layer_norm("ln_pre", self.ln_eps, self.dtype)(x + pos.astype(self.dtype))
        block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        act = "quick_gelu" if self.quick_gelu else "gelu"
        for i in range(self.layers):
            x = block(w, self.heads, self.mlp_ratio, act, False, self.ln_eps, self.dtype, name=f"resblocks_{i}")(x)
        x = layer_norm("ln_post", self.ln_eps, self.dtype)(x[:, 0])
        proj = self.param("proj", nn.initializers.normal(w ** -0.5), (w, self.embed_dim))
        return jnp.einsum("bw,we->be", x, proj.astype(self.dtype)).astype(jnp.float32)


class CLIP(nn.Module):
    """`apply(v, images, ids)` → dict(image_features, text_features, logit_scale);
    `method=CLIP.encode_image` / `CLIP.encode_text` for one tower."""

    embed_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24
    text_mlp_ratio: float = 4.0
    quick_gelu: bool = False
    eos_id: int = 49407
    ln_eps: float = 1e-5
    variable_length: bool = False
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.visual = clip_vision_tower(self)
        self.text = clip_text_tower(self)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), ())

    def encode_image(self, images):
        return self.visual(images)

    def encode_text(self, ids, attention_mask=None):
        """(B, E) pooled, projected, unnormalised text features."""
        return self.text(ids, attention_mask).pooled[:, 0]

    def text_hidden(self, ids, attention_mask=None):
        """The full text tower output (`ClipTextOutput`; `text_guidance` = last hidden state)."""
        return self.text(ids, attention_mask)

    def __call__(self, images, ids, attention_mask=None):
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(ids, attention_mask),
            "logit_scale": self.logit_scale,
        }


class HFCLIPModel(CLIP):
    """transformers `CLIPModel` (PickScore): the same network as `CLIP`; its own class so that a
    converted checkpoint names its key mapping. Ids may be shorter than the context (HF
    position ids arange(T)), and an attention mask may be passed."""

    variable_length: bool = True


def clip_vision_tower(clip: CLIP) -> ClipVisionTransformer:
    """The image tower of `clip` (unbound outside `apply`): apply it with `params["visual"]`
    alone, e.g. in a reward step that needs no text tower."""
    return ClipVisionTransformer(
        clip.image_size, clip.patch_size, clip.vision_width, clip.vision_layers, clip.vision_heads,
        clip.vision_mlp_ratio, clip.embed_dim, clip.quick_gelu, clip.ln_eps, clip.dtype, clip.remat,
    )


def clip_text_tower(clip: CLIP) -> ClipTextTransformer:
    """The text tower of `clip` as a ClipTextTransformer (unbound when called outside `apply`;
    converters read its sizes)."""
    return ClipTextTransformer(
        vocab_size=clip.vocab_size, context_length=clip.context_length, width=clip.text_width,
        heads=clip.text_heads, layers=clip.text_layers, embed_dim=clip.embed_dim,
        quick_gelu=clip.quick_gelu, pool_type="argmax", eos_id=clip.eos_id, ln_eps=clip.ln_eps,
        dtype=clip.dtype, remat=clip.remat, mlp_ratio=clip.text_mlp_ratio,
        variable_length=clip.variable_length,
    )


def l2_normalize(x, eps: float = 1e-12):
    """F.normalize(x, dim=-1): x / max(‖x‖, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def clip_logits(image_features, text_features, logit_scale):
    """CLIP.get_logits / CLIPModel.forward: exp(s)·img_n @ txt_nᵀ (B_img, B_txt)."""
    return jnp.exp(logit_scale) * l2_normalize(image_features) @ l2_normalize(text_features).T


def hps_score(image_features, text_features):
    """HPS v2 (and CLIP score): per-pair cosine of normalised features, no logit scale (B,)."""
    return jnp.sum(l2_normalize(image_features) * l2_normalize(text_features), axis=-1)


def pickscore(image_features, text_features, logit_scale):
    """PickScore: exp(logit_scale)·⟨text_n, image_n⟩ per (prompt i, image i) pair (B,)."""
    return jnp.exp(logit_scale) * hps_score(image_features, text_features)


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def openclip_from_cfg(cfg: Mapping[str, Any], **overrides) -> CLIP:
    """From an OpenCLIP model config (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`), as
    in open_clip's `model_configs/*.json` and the parity fixtures."""
    v, t = _get(cfg, "vision_cfg", {}), _get(cfg, "text_cfg", {})
    vw = int(_get(v, "width", 768))
    head_width = int(_get(v, "head_width", 64))
    if vw % head_width:
        raise ValueError(f"vision width {vw} is not divisible by head_width {head_width}")
    vocab = int(_get(t, "vocab_size", 49408))
    kwargs = dict(
        embed_dim=int(_get(cfg, "embed_dim", 512)),
        image_size=int(_get(v, "image_size", 224)),
        patch_size=int(_get(v, "patch_size", 16)),
        vision_width=vw,
        vision_layers=int(_get(v, "layers", 12)),
        vision_heads=vw // head_width,
        vision_mlp_ratio=float(_get(v, "mlp_ratio", 4.0)),
        vocab_size=vocab,
        context_length=int(_get(t, "context_length", 77)),
        text_width=int(_get(t, "width", 512)),
        text_heads=int(_get(t, "heads", 8)),
        text_layers=int(_get(t, "layers", 12)),
        text_mlp_ratio=float(_get(t, "mlp_ratio", 4.0)),
        quick_gelu=bool(_get(cfg, "quick_gelu", False)),
        eos_id=int(_get(cfg, "eot_id", vocab - 1)),
        ln_eps=float(_get(cfg, "layer_norm_eps", 1e-5)),
    )
    kwargs.update(overrides)
    return CLIP(**kwargs)


_HF_ACTS = {"gelu": False, "quick_gelu": True}


def hfclip_from_cfg(cfg: Mapping[str, Any], **overrides) -> CLIP:
    """From a transformers CLIPConfig tree (`text_config`, `vision_config`, `projection_dim`;
    the fixtures keep `projection_dim` under `clip_config`)."""
    t, v = _get(cfg, "text_config", {}), _get(cfg, "vision_config", {})
    top = _get(cfg, "clip_config", None) or cfg
    acts = {str(_get(t, "hidden_act", "quick_gelu")), str(_get(v, "hidden_act", "quick_gelu"))}
    if len(acts) != 1 or not acts <= set(_HF_ACTS):
        raise ValueError(f"unsupported CLIP activations {sorted(acts)}; expected one of {sorted(_HF_ACTS)} for both towers")
    eps = {float(_get(t, "layer_norm_eps", 1e-5)), float(_get(v, "layer_norm_eps", 1e-5))}
    if len(eps) != 1:
        raise ValueError(f"text and vision layer_norm_eps differ ({sorted(eps)}); not supported")
    tw, vw = int(_get(t, "hidden_size", 512)), int(_get(v, "hidden_size", 768))
    vocab = int(_get(t, "vocab_size", 49408))
    kwargs = dict(
        embed_dim=int(_get(top, "projection_dim", _get(t, "projection_dim", 512))),
        image_size=int(_get(v, "image_size", 224)),
        patch_size=int(_get(v, "patch_size", 32)),
        vision_width=vw,
        vision_layers=int(_get(v, "num_hidden_layers", 12)),
        vision_heads=int(_get(v, "num_attention_heads", 12)),
        vision_mlp_ratio=int(_get(v, "intermediate_size", 3072)) / vw,
        vocab_size=vocab,
        context_length=int(_get(t, "max_position_embeddings", 77)),
        text_width=tw,
        text_heads=int(_get(t, "num_attention_heads", 8)),
        text_layers=int(_get(t, "num_hidden_layers", 12)),
        text_mlp_ratio=int(_get(t, "intermediate_size", 2048)) / tw,
        quick_gelu=_HF_ACTS[acts.pop()],
        eos_id=int(_get(cfg, "eot_id", vocab - 1)),
        ln_eps=eps.pop(),
        variable_length=True,
    )
    kwargs.update(overrides)
    return HFCLIPModel(**kwargs)


def clip_expected_params(model: CLIP) -> Any:
    images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, model.context_length), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, ids))["params"]
