"""CLIP reward-model checkpoints -> params of `models.clip.CLIP` (strict, torch-free).

Two key mappings onto the one module:
- OpenCLIP `CLIP` (`open_clip_pytorch_model.bin` / `.safetensors`, and HPS v2 / v2.1, whose
  file wraps the same state dict under `state_dict`): `visual.*` + the text tower at the top
  level (shared with MaskGen's text-tower converter) + `logit_scale`;
- transformers `CLIPModel` (PickScore's `model.safetensors`): `vision_model.*`,
  `text_model.*`, `visual_projection`, `text_projection`, `logit_scale`; the separate q/k/v
  projections are stacked into the packed in_proj (q, k, v order). The legacy buffers
  `*.embeddings.position_ids` are skipped.

Layouts: Linear (out, in) -> kernel (in, out); Conv2d (out, in, kh, kw) -> (kh, kw, in, out);
OpenCLIP's `visual.proj` / `text_projection` are already (in, out). Float32 sources stay
views where possible (a 1B-parameter checkpoint is not copied twice).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from softdimo_jax.conversion.maskgen import openclip_resblock_params, openclip_text_params
from softdimo_jax.conversion.state_dict import ConversionError, StrictStateDict, check_params_match
from softdimo_jax.models.clip import CLIP, clip_expected_params, clip_text_tower
from softdimo_jax.models.clip_text import ClipTextTransformer


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _take(s: StrictStateDict, key: str, shape, transform=_f32):
    return s.take(key, shape, dtype=None, transform=transform)


def _lin_t(w):
    return _f32(w).T


def _norm(s, prefix, n):
    return {"scale": _take(s, prefix + ".weight", (n,)), "bias": _take(s, prefix + ".bias", (n,))}


def _dense(s, prefix, n_in, n_out):
    return {"kernel": _take(s, prefix + ".weight", (n_out, n_in), _lin_t), "bias": _take(s, prefix + ".bias", (n_out,))}


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    """np.concatenate on axis 0; constant broadcast inputs (stride 0, as in the full-size
    key-list checks) stay a broadcast view instead of allocating the stacked tensor."""
    shape = (sum(p.shape[0] for p in parts),) + parts[0].shape[1:]
    if all(p.size and not any(p.strides) for p in parts):
        first = parts[0].reshape(-1)[0]
        if all(p.reshape(-1)[0] == first for p in parts):
            return np.broadcast_to(np.asarray(first, dtype=parts[0].dtype), shape)
    return np.concatenate(parts, axis=0)


def _family_hint(s: StrictStateDict, want: str) -> None:
    """One clear line when the file is another family's checkpoint (instead of a key dump)."""
    keys = list(s.keys())
    hf = any(k.startswith(("vision_model.", "text_model.")) for k in keys)
    oc = any(k.startswith("visual.") for k in keys) or "token_embedding.weight" in s
    blip = any(k.startswith(("blip.", "mlp.layers.", "visual_encoder.", "text_encoder.")) for k in keys)
    found = "an ImageReward/BLIP" if blip else "a transformers CLIPModel (PickScore)" if hf else "an OpenCLIP" if oc else None
    if want == "openclip" and (blip or hf) or want == "hfclip" and (blip or oc and not hf):
        fix = ("the ImageReward family" if blip else "--model hfclip" if hf else "--model openclip")
        what = "an OpenCLIP" if want == "openclip" else "a transformers CLIPModel"
        raise ConversionError(f"{s.name}: this is {found} checkpoint, not {what} one — convert it with {fix}")


# ----------------------------------------------------------------------------------------
# OpenCLIP (CLIP score, HPS v2)


def _visual_openclip(s: StrictStateDict, m: CLIP) -> dict:
    w, p = m.vision_width, m.patch_size
    n = (m.image_size // p) ** 2 + 1
    v = {
        "conv1": {"kernel": _take(s, "visual.conv1.weight", (w, 3, p, p), lambda a: _f32(a).transpose(2, 3, 1, 0))},
        "class_embedding": _take(s, "visual.class_embedding", (w,)),
        "positional_embedding": _take(s, "visual.positional_embedding", (n, w)),
        "ln_pre": _norm(s, "visual.ln_pre", w),
        "ln_post": _norm(s, "visual.ln_post", w),
        "proj": _take(s, "visual.proj", (w, m.embed_dim)),
    }
    for i in range(m.vision_layers):
        v[f"resblocks_{i}"] = openclip_resblock_params(s, f"visual.transformer.resblocks.{i}.", w, m.vision_mlp_ratio)
    return v


def convert_openclip(sd: Mapping[str, np.ndarray], model: CLIP, *, name: str = "openclip") -> dict:
    """OpenCLIP `CLIP` state dict (ViT image tower) -> params of `model` (strict)."""
    s = StrictStateDict(sd, name=name)
    _family_hint(s, "openclip")
    p: dict[str, Any] = {
        "visual": _visual_openclip(s, model),
        "text": openclip_text_params(s, clip_text_tower(model)),
        "logit_scale": _take(s, "logit_scale", ()),
    }
    s.skip("attn_mask")  # a buffer in OpenAI's original layout; the causal mask is rebuilt
    s.finish()
    check_params_match(p, clip_expected_params(model), name=name)
    return p


# ----------------------------------------------------------------------------------------
# transformers CLIPModel (PickScore)


def _hf_layer(s: StrictStateDict, pre: str, w: int, mlp_ratio: float) -> dict:
    h = int(round(w * mlp_ratio))
    a = pre + "self_attn."
    qkv_w = [_take(s, a + f"{x}_proj.weight", (w, w)) for x in "qkv"]
    qkv_b = [_take(s, a + f"{x}_proj.bias", (w,)) for x in "qkv"]
    return {
        "ln_1": _norm(s, pre + "layer_norm1", w),
        "attn": {
            "in_proj": {"kernel": _stack(qkv_w).T, "bias": _stack(qkv_b)},
            "out_proj": _dense(s, a + "out_proj", w, w),
        },
        "ln_2": _norm(s, pre + "layer_norm2", w),
        "c_fc": _dense(s, pre + "mlp.fc1", w, h),
        "c_proj": _dense(s, pre + "mlp.fc2", h, w),
    }


def hf_text_params(s: StrictStateDict, tower: ClipTextTransformer, prefix: str = "text_model.",
                   projection: str = "text_projection.weight") -> dict:
    """transformers `CLIPTextTransformer` keys under `prefix` + the (bias-free) projection ->
    params of a ClipTextTransformer (CLIPModel's text side, CLIPTextModelWithProjection).
    The legacy `embeddings.position_ids` buffer is skipped."""
    tw = tower.width
    text = {
        "token_embedding": {"embedding": _take(s, prefix + "embeddings.token_embedding.weight", (tower.vocab_size, tw))},
        "positional_embedding": _take(s, prefix + "embeddings.position_embedding.weight", (tower.context_length, tw)),
        "ln_final": _norm(s, prefix + "final_layer_norm", tw),
        "text_projection": _take(s, projection, (tower.embed_dim, tw), _lin_t),
    }
    for i in range(tower.layers):
        text[f"resblocks_{i}"] = _hf_layer(s, f"{prefix}encoder.layers.{i}.", tw, tower.mlp_ratio)
    s.skip(prefix + "embeddings.position_ids")
    return text


def convert_hfclip(sd: Mapping[str, np.ndarray], model: CLIP, *, name: str = "hfclip") -> dict:
    """transformers `CLIPModel` state dict -> params of `model` (strict)."""
    s = StrictStateDict(sd, name=name)
    _family_hint(s, "hfclip")
    w, p, e = model.vision_width, model.patch_size, model.embed_dim
    n = (model.image_size // p) ** 2 + 1
    vm = "vision_model."
    visual = {
        "conv1": {"kernel": _take(s, vm + "embeddings.patch_embedding.weight", (w, 3, p, p),
                                  lambda a: _f32(a).transpose(2, 3, 1, 0))},
        "class_embedding": _take(s, vm + "embeddings.class_embedding", (w,)),
        "positional_embedding": _take(s, vm + "embeddings.position_embedding.weight", (n, w)),
        "ln_pre": _norm(s, vm + "pre_layrnorm", w),
        "ln_post": _norm(s, vm + "post_layernorm", w),
        "proj": _take(s, "visual_projection.weight", (e, w), _lin_t),
    }
    for i in range(model.vision_layers):
        visual[f"resblocks_{i}"] = _hf_layer(s, f"{vm}encoder.layers.{i}.", w, model.vision_mlp_ratio)
    text = hf_text_params(s, clip_text_tower(model))
    params = {"visual": visual, "text": text, "logit_scale": _take(s, "logit_scale", ())}
    s.skip(vm + "embeddings.position_ids")  # legacy buffer
    s.finish()
    check_params_match(params, clip_expected_params(model), name=name)
    return params


# ----------------------------------------------------------------------------------------
# Released sizes (softdimo_jax.convert's family table; `bits` is unused)


def openclip_defaults(bits=None) -> dict:
    """OpenCLIP ViT-H-14 with exact GELU: HPS v2 / v2.1 (986.1M parameters). For CLIP score
    with OpenAI's ViT-L-14 pass `openclip_vit_l_14_overrides()` (see the README)."""
    return dict(embed_dim=1024, image_size=224, patch_size=14, vision_width=1280, vision_layers=32,
                vision_heads=16, vision_mlp_ratio=4.0, vocab_size=49408, context_length=77,
                text_width=1024, text_heads=16, text_layers=24, text_mlp_ratio=4.0, quick_gelu=False,
                eos_id=49407, ln_eps=1e-5, variable_length=False)


def openclip_vit_l_14_overrides() -> dict:
    """ViT-L-14 (CLIP score; 427.6M). OpenAI's weights use QuickGELU, LAION's exact GELU."""
    return dict(embed_dim=768, vision_width=1024, vision_layers=24, vision_heads=16,
                text_width=768, text_heads=12, text_layers=12, quick_gelu=True)


def hfclip_defaults(bits=None) -> dict:
    """transformers CLIPModel with PickScore's CLIP-H config (986.1M parameters; exact GELU)."""
    return dict(openclip_defaults(), variable_length=True)
