"""ImageReward (THUDM) as a Flax linen module: BLIP's ViT, BLIP's med.py BERT text encoder
cross-attending to the image tokens, and the reward MLP head.

Parameter layout (see `softdimo_jax.conversion.blip` for the mapping from `ImageReward.pt`):

- `visual_encoder` — BLIP's `VisionTransformer`: patch conv (with bias), class token first,
  `pos_embed` (1, 1+N, W) added, pre-LN blocks with a fused q/k/v projection (with bias,
  split as (3, heads, head_dim) — the same packing as torch MultiheadAttention, so the blocks
  are `clip_text.ResidualAttentionBlock` with exact GELU and LN eps 1e-6), final LN over
  every token. All tokens, class token included, are the text encoder's cross-attention
  memory.
- `text_encoder` — med.py `BertModel` in its default mode 'multimodal', without pooler:
  word + absolute position embeddings (no token-type embedding), LN; per layer post-LN
  self-attention (padding mask added as (1 − mask)·(−10000), bidirectional), post-LN
  cross-attention (queries from the text, keys/values projected from the ViT width; the
  image mask is all ones, so no bias), post-LN GELU MLP. LN eps 1e-12.
- `mlp` — Linears hidden→1024→128→64→16→1 with **no activations** (the original's ReLUs
  are commented out; its Dropouts are identity in eval).

reward = (mlp(last_hidden_state[:, 0]) − reward_mean) / reward_std (ImageReward's
`score_gard`; the [CLS] token is read as is, no [ENC] swap).

Images enter NHWC, already resized/cropped to `image_size` and normalised with the OpenAI
CLIP mean/std (`core.image_reward` does that from [0, 1] images).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from softdimo_jax.models.clip_text import ResidualAttentionBlock, layer_norm
from softdimo_jax.models.lean_grads import exact_gelu, softmax_f32

# ImageReward v1.0's published normalisation of the raw MLP output.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
# med.py's additive padding mask value (not -inf: a fully padded row still averages).
_MASK_VALUE = -10000.0


class ImageRewardOutput(NamedTuple):
    image_embeds: Any  # (B, 1+N, W_vit)
    text_last_hidden_state: Any  # (B, T, H)
    text_cls_feature: Any  # (B, H)
    mlp_raw: Any  # (B, 1)
    reward: Any  # (B, 1)


class BlipViT(nn.Module):
    """BLIP's VisionTransformer (eval): (B, S, S, 3) normalised NHWC -> (B, 1+N, W)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, images):
        b, h, w, c = images.shape
        s, p = self.image_size, self.patch_size
        # timm's PatchEmbed refuses any other size; pos_embed is fixed to (S/p)² + 1 rows.
        if (h, w, c) != (s, s, 3):
            raise ValueError(f"BLIP ViT images must be (B, {s}, {s}, 3) NHWC, got {images.shape}")
        if s % p:
            raise ValueError(f"image_size {s} is not a multiple of patch_size {p}")
        n = (s // p) ** 2
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="patch_embed")(images.astype(self.dtype)).reshape(b, n, self.width)
        init = nn.initializers.normal(0.02)
        cls = self.param("cls_token", init, (1, 1, self.width))
        pos = self.param("pos_embed", init, (1, n + 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
        x = (x + pos).astype(self.dtype)
        block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        for i in range(self.depth):
            x = block(self.width, self.heads, self.mlp_ratio, "gelu", False, self.ln_eps, self.dtype,
                      name=f"blocks_{i}")(x)
        return layer_norm("norm", self.ln_eps, self.dtype)(x)


class BertAttention(nn.Module):
    """med.py `BertAttention`: `query`/`key`/`value` Linears (keys/values from `memory`, of
    any width), scores / sqrt(head_dim) + additive `bias`, softmax, `dense`, then
    LN(dense(ctx) + x) (post-LN)."""

    hidden: int
    heads: int
    ln_eps: float = 1e-12
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, memory, bias=None):
        if self.hidden % self.heads:
            raise ValueError(f"text hidden size {self.hidden} is not divisible by heads {self.heads}")
        b, t, _ = x.shape
        m = memory.shape[1]
        hd = self.hidden // self.heads
        dense = lambda name: nn.Dense(self.hidden, dtype=self.dtype, name=name)
        q = dense("query")(x).reshape(b, t, self.heads, hd)
        k = dense("key")(memory).reshape(b, m, self.heads, hd)
        v = dense("value")(memory).reshape(b, m, self.heads, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        if bias is not None:
            scores = scores + bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", softmax_f32(scores, v.dtype), v).reshape(b, t, self.hidden)
        out = dense("dense")(ctx)
        return layer_norm("LayerNorm", self.ln_eps, self.dtype)(out + x)


class BertCrossLayer(nn.Module):
    """med.py `BertLayer` in mode 'multimodal': self-attention, cross-attention, GELU MLP."""

    hidden: int
    heads: int
    intermediate: int
    ln_eps: float = 1e-12
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask_bias, image_embeds):
        x = BertAttention(self.hidden, self.heads, self.ln_eps, self.dtype, name="attention")(x, x, mask_bias)
        x = BertAttention(self.hidden, self.heads, self.ln_eps, self.dtype, name="crossattention")(
            x, image_embeds)
        h = exact_gelu(nn.Dense(self.intermediate, dtype=self.dtype, name="intermediate")(x))
        h = nn.Dense(self.hidden, dtype=self.dtype, name="output")(h)
        return layer_norm("output_LayerNorm", self.ln_eps, self.dtype)(h + x)


class MedBertEncoder(nn.Module):
    """med.py `BertModel(add_pooling_layer=False)` in mode 'multimodal'.

    (ids (B, T) int, mask (B, T) {0, 1}, image_embeds (B, M, W)) -> last_hidden_state (B, T, H).
    """

    vocab_size: int = 30524
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_position_embeddings: int = 512
    ln_eps: float = 1e-12
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, ids, mask, image_embeds):
        ids = jnp.asarray(ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"prompt ids must be (B, T), got shape {ids.shape}")
        t = ids.shape[1]
        if t > self.max_position_embeddings:
            raise ValueError(f"prompt length {t} exceeds the text encoder's {self.max_position_embeddings} "
                             "positions; tokenize with truncation to at most that many tokens")
        init = nn.initializers.normal(0.02)
        words = nn.Embed(self.vocab_size, self.hidden, embedding_init=init, name="word_embeddings")(ids)
        pos = nn.Embed(self.max_position_embeddings, self.hidden, embedding_init=init,
                       name="position_embeddings")(jnp.arange(t))
        x = layer_norm("LayerNorm", self.ln_eps, self.dtype)((words + pos[None]).astype(self.dtype))
        # get_extended_attention_mask: (1 − mask)·(−10000) added to every query row.
        mask_bias = (1.0 - jnp.asarray(mask, jnp.float32))[:, None, None, :] * _MASK_VALUE
        image_embeds = image_embeds.astype(self.dtype)
        layer = nn.remat(BertCrossLayer) if self.remat else BertCrossLayer
        for i in range(self.layers):
            x = layer(self.hidden, self.heads, self.intermediate, self.ln_eps, self.dtype,
                      name=f"layer_{i}")(x, mask_bias, image_embeds)
        return x


class ImageReward(nn.Module):
    """ImageReward: `apply(v, images, ids, mask)` -> ImageRewardOutput (see module docstring).

    images (B, S, S, 3) NHWC normalised; ids / mask (B, T) from the BERT tokenizer
    (`data.wordpiece`, padded to 35 as ImageReward does). Reward shape (B, 1) as the original.
    """

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    vision_ln_eps: float = 1e-6
    vocab_size: int = 30524
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    max_position_embeddings: int = 512
    text_ln_eps: float = 1e-12
    mlp_dims: tuple[int, ...] = (1024, 128, 64, 16, 1)
    reward_mean: float = REWARD_MEAN
    reward_std: float = REWARD_STD
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        if not self.mlp_dims or self.mlp_dims[-1] != 1:
            raise ValueError(f"mlp_dims must end in 1 (one score per image), got {self.mlp_dims}")
        self.visual_encoder = BlipViT(
            self.image_size, self.patch_size, self.vision_width, self.vision_depth, self.vision_heads,
            self.vision_mlp_ratio, self.vision_ln_eps, self.dtype, self.remat)
        self.text_encoder = MedBertEncoder(
            self.vocab_size, self.text_hidden, self.text_layers, self.text_heads, self.text_intermediate,
            self.max_position_embeddings, self.text_ln_eps, self.dtype, self.remat)
        self.mlp = [nn.Dense(d, dtype=self.dtype, name=f"mlp_{i}") for i, d in enumerate(self.mlp_dims)]

    def encode_image(self, images):
        return self.visual_encoder(images)

    def head(self, features):
        """MLP head (no activations) on the [CLS] feature (B, H) -> raw score (B, 1)."""
        x = features
        for layer in self.mlp:
            x = layer(x)
        return x

    def __call__(self, images, ids, mask) -> ImageRewardOutput:
        image_embeds = self.encode_image(images)
        hidden = self.text_encoder(ids, mask, image_embeds)
        cls = hidden[:, 0]
        raw = self.head(cls).astype(jnp.float32)
        reward = (raw - self.reward_mean) / self.reward_std
        f32 = lambda a: a.astype(jnp.float32)
        return ImageRewardOutput(f32(image_embeds), f32(hidden), f32(cls), raw, reward)


def _get(cfg: Any, key: str, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def image_reward_from_cfg(cfg: Mapping[str, Any], **overrides) -> ImageReward:
    """Builds the module from a fixture-style cfg: `med_config` (BERT config JSON as
    ImageReward ships it), `vit` {image_size, patch_size, width, depth, heads, mlp_ratio,
    layer_norm_eps}, `mlp` {layers: [in, ..., 1]}, `reward_mean`, `reward_std`. Missing
    entries take ImageReward v1.0's values (ViT-L/16 at 224, BERT-base)."""
    med = _get(cfg, "med_config", {}) or {}
    vit = _get(cfg, "vit", {}) or {}
    mlp = _get(cfg, "mlp", {}) or {}
    layers = _get(mlp, "layers", None)
    kwargs = dict(
        image_size=int(_get(vit, "image_size", 224)),
        patch_size=int(_get(vit, "patch_size", 16)),
        vision_width=int(_get(vit, "width", 1024)),
        vision_depth=int(_get(vit, "depth", 24)),
        vision_heads=int(_get(vit, "heads", 16)),
        vision_mlp_ratio=float(_get(vit, "mlp_ratio", 4.0)),
        vision_ln_eps=float(_get(vit, "layer_norm_eps", 1e-6)),
        vocab_size=int(_get(med, "vocab_size", 30524)),
        text_hidden=int(_get(med, "hidden_size", 768)),
        text_layers=int(_get(med, "num_hidden_layers", 12)),
        text_heads=int(_get(med, "num_attention_heads", 12)),
        text_intermediate=int(_get(med, "intermediate_size", 3072)),
        max_position_embeddings=int(_get(med, "max_position_embeddings", 512)),
        text_ln_eps=float(_get(med, "layer_norm_eps", 1e-12)),
        mlp_dims=tuple(int(d) for d in layers[1:]) if layers else (1024, 128, 64, 16, 1),
        reward_mean=float(_get(cfg, "reward_mean", REWARD_MEAN)),
        reward_std=float(_get(cfg, "reward_std", REWARD_STD)),
    )
    if layers and int(layers[0]) != kwargs["text_hidden"]:
        raise ValueError(f"the MLP input {layers[0]} must equal the text hidden size {kwargs['text_hidden']}")
    # What ImageReward fixes and the port assumes: refuse a cfg that says otherwise.
    unsupported = {
        "med_config.hidden_act": (str(_get(med, "hidden_act", "gelu")), "gelu"),
        "med_config.position_embedding_type": (str(_get(med, "position_embedding_type", "absolute")), "absolute"),
        "med_config.add_cross_attention": (bool(_get(med, "add_cross_attention", True)), True),
        "vit.qkv_bias": (bool(_get(vit, "qkv_bias", True)), True),
        "mlp.activations": (_get(mlp, "activations", None), None),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"{key} = {got!r} is not supported (ImageReward uses {want!r})")
    kwargs.update(overrides)
    return ImageReward(**kwargs)


def image_reward_expected_params(model: ImageReward) -> Any:
    """The params shape tree of `model` (no allocation)."""
    s = model.image_size
    images = jnp.zeros((1, s, s, 3), jnp.float32)
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, ids, jnp.ones((1, 2))))["params"]
