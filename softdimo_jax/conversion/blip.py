"""ImageReward's `ImageReward.pt` (a flat PyTorch state dict) -> params of `models.blip.ImageReward`.

Strict like the other converters: every target filled, shapes checked on the PyTorch
layout, every source key used or deliberately skipped; one `ConversionError` lists every
problem. ImageReward itself loads the file with `strict=False`; the keys it loads but never
reads are exactly these, and they are the only ones skipped here:

- `blip.vision_proj.{weight,bias}`, `blip.text_proj.{weight,bias}`: BLIP_Pretrain's
  contrastive projections, built by the constructor and never called by `score`/`score_gard`;
- `blip.text_encoder.embeddings.position_ids`: a persistent buffer arange(max_positions),
  recomputed by the port (optional: newer saves drop it).

Anything else (another family's checkpoint, a BLIP captioning/ITM checkpoint with
`text_decoder.*` or momentum encoders, a missing layer) is refused.

Layouts: Linear (out, in) -> kernel (in, out); Conv2d (out, in, kh, kw) -> (kh, kw, in, out);
the ViT's fused `attn.qkv` (3W, W) keeps its q, k, v order on the output axis (the same
packing as torch MultiheadAttention's `in_proj_weight`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from softdimo_jax.conversion.state_dict import ConversionError, StrictStateDict, check_params_match
from softdimo_jax.models.blip import ImageReward, image_reward_expected_params

# Keys ImageReward's strict=False load accepts but its reward never reads (see docstring).
UNUSED_KEYS = (
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)
# Indices of the Linears in ImageReward's `mlp.layers` nn.Sequential (Dropouts in between).
MLP_LINEAR_INDICES = (0, 2, 4, 6, 7)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _take(s: StrictStateDict, key: str, shape, transform=_f32):
    return s.take(key, shape, dtype=None, transform=transform)


def _dense(s: StrictStateDict, prefix: str, n_in: int, n_out: int) -> dict:
    return {"kernel": _take(s, prefix + ".weight", (n_out, n_in), lambda w: _f32(w).T),
            "bias": _take(s, prefix + ".bias", (n_out,))}


def _norm(s: StrictStateDict, prefix: str, n: int) -> dict:
    return {"scale": _take(s, prefix + ".weight", (n,)), "bias": _take(s, prefix + ".bias", (n,))}


def _vit(s: StrictStateDict, m: ImageReward) -> dict:
    w, p = m.vision_width, m.patch_size
    n = (m.image_size // p) ** 2
    hidden = int(w * m.vision_mlp_ratio)
    pre = "blip.visual_encoder."
    out: dict[str, Any] = {
        "patch_embed": {
            "kernel": _take(s, pre + "patch_embed.proj.weight", (w, 3, p, p), lambda a: _f32(a).transpose(2, 3, 1, 0)),
            "bias": _take(s, pre + "patch_embed.proj.bias", (w,)),
        },
        "cls_token": _take(s, pre + "cls_token", (1, 1, w)),
        "pos_embed": _take(s, pre + "pos_embed", (1, n + 1, w)),
        "norm": _norm(s, pre + "norm", w),
    }
    for i in range(m.vision_depth):
        b = f"{pre}blocks.{i}."
        out[f"blocks_{i}"] = {
            "ln_1": _norm(s, b + "norm1", w),
            "attn": {"in_proj": _dense(s, b + "attn.qkv", w, 3 * w), "out_proj": _dense(s, b + "attn.proj", w, w)},
            "ln_2": _norm(s, b + "norm2", w),
            "c_fc": _dense(s, b + "mlp.fc1", w, hidden),
            "c_proj": _dense(s, b + "mlp.fc2", hidden, w),
        }
    return out


def _attention(s: StrictStateDict, pre: str, h: int, kv_width: int) -> dict:
    return {
        "query": _dense(s, pre + "self.query", h, h),
        "key": _dense(s, pre + "self.key", kv_width, h),
        "value": _dense(s, pre + "self.value", kv_width, h),
        "dense": _dense(s, pre + "output.dense", h, h),
        "LayerNorm": _norm(s, pre + "output.LayerNorm", h),
    }


def _text(s: StrictStateDict, m: ImageReward) -> dict:
    h, pre = m.text_hidden, "blip.text_encoder."
    out: dict[str, Any] = {
        "word_embeddings": {"embedding": _take(s, pre + "embeddings.word_embeddings.weight", (m.vocab_size, h))},
        "position_embeddings": {"embedding": _take(
            s, pre + "embeddings.position_embeddings.weight", (m.max_position_embeddings, h))},
        "LayerNorm": _norm(s, pre + "embeddings.LayerNorm", h),
    }
    for i in range(m.text_layers):
        b = f"{pre}encoder.layer.{i}."
        out[f"layer_{i}"] = {
            "attention": _attention(s, b + "attention.", h, h),
            # BLIP_Pretrain sets encoder_width to the ViT width: keys/values map W_vit -> H.
            "crossattention": _attention(s, b + "crossattention.", h, m.vision_width),
            "intermediate": _dense(s, b + "intermediate.dense", h, m.text_intermediate),
            "output": _dense(s, b + "output.dense", m.text_intermediate, h),
            "output_LayerNorm": _norm(s, b + "output.LayerNorm", h),
        }
    return out


# Key patterns of the other reward checkpoints, to name the right --model in the refusal.
_OTHER_FAMILIES = (
    ("visual.transformer.resblocks.", "an OpenCLIP checkpoint (CLIP / HPS v2)", "convert it with --model openclip"),
    ("vision_model.encoder.layers.", "a Hugging Face CLIPModel (PickScore)", "convert it with --model hfclip"),
    ("visual_encoder.blocks.", "a BLIP checkpoint without ImageReward's 'blip.' prefix and 'mlp.layers.*' head",
     "pass ImageReward.pt from the THUDM/ImageReward release"),
)


def check_is_image_reward(sd: Mapping[str, np.ndarray], name: str) -> None:
    """One-line refusal of a checkpoint that is not ImageReward's (before the long key report)."""
    if any(k.startswith("blip.visual_encoder.") for k in sd) and any(k.startswith("mlp.layers.") for k in sd):
        return
    for pattern, what, fix in _OTHER_FAMILIES:
        if any(k.startswith(pattern) for k in sd):
            raise ConversionError(f"{name} is not an ImageReward checkpoint, it looks like {what} — {fix}")
    raise ConversionError(f"{name} is not an ImageReward checkpoint (no 'blip.visual_encoder.*' and 'mlp.layers.*' "
                          "keys) — pass ImageReward.pt from the THUDM/ImageReward release, or pick the --model "
                          "of this checkpoint's family")


def convert_image_reward(sd: Mapping[str, np.ndarray], model: ImageReward, *, name: str = "ImageReward.pt") -> dict:
    """ImageReward state dict -> params of `model` (strict; see module docstring)."""
    check_is_image_reward(sd, name)
    if len(model.mlp_dims) != len(MLP_LINEAR_INDICES):
        raise ConversionError(f"{name}: ImageReward's head has {len(MLP_LINEAR_INDICES)} Linears, "
                              f"the model was built with mlp_dims={model.mlp_dims}")
    s = StrictStateDict(sd, name=name)
    params: dict[str, Any] = {"visual_encoder": _vit(s, model), "text_encoder": _text(s, model)}
    dims = (model.text_hidden,) + tuple(model.mlp_dims)
    for j, idx in enumerate(MLP_LINEAR_INDICES):
        params[f"mlp_{j}"] = _dense(s, f"mlp.layers.{idx}", dims[j], dims[j + 1])
    # Read shape-checked only when present: they do not influence the reward.
    pos_ids = s.shape("blip.text_encoder.embeddings.position_ids")
    if pos_ids is not None and pos_ids[-1] != model.max_position_embeddings:
        s.misshapen.append(f"blip.text_encoder.embeddings.position_ids: checkpoint {pos_ids}, model expects "
                           f"(1, {model.max_position_embeddings})")
    s.skip(*UNUSED_KEYS)
    s.finish()
    check_params_match(params, image_reward_expected_params(model), name=name)
    return params


def image_reward_defaults(bits=None) -> dict:
    """ImageReward v1.0: BLIP ViT-L/16 at 224 + BERT-base med_config (vocab 30524)."""
    del bits
    return dict(image_size=224, patch_size=16, vision_width=1024, vision_depth=24, vision_heads=16,
                vocab_size=30524, text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
                max_position_embeddings=512, mlp_dims=(1024, 128, 64, 16, 1))
