"""Meissonic's diffusers-format checkpoints -> Flax params: the `transformer/` and `vqvae/`
folders (config.json + diffusion_pytorch_model.safetensors or .bin) and the `text_encoder/`
folder (transformers' CLIPTextModelWithProjection: config.json + model.safetensors or
pytorch_model.bin; key mapping shared with `conversion.clip.hf_text_params`).

The architecture is read from config.json (`meissonic_transformer_config_from_json`,
`meissonic_vq_config_from_json`), never guessed; a config of another class is refused in
one line. Converters are strict and driven by the Flax module's own parameter tree
(jax.eval_shape, nothing allocated): every target parameter is looked up under its
PyTorch name with the PyTorch shape checked first, every source key must be used, and one
`ConversionError` lists every problem. Layouts: Linear (out, in) -> (in, out); Conv2d
(out, in, kh, kw) -> (kh, kw, in, out); 1x1 convs are Dense layers here ((out, in, 1, 1) ->
(in, out)); the up-sampling ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out).
Float32 sources are not copied (views), so zero-stride stand-ins of full-size checkpoints
convert without allocating.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from softdimo_jax.conversion.clip import hf_text_params
from softdimo_jax.conversion.state_dict import ConversionError, StrictStateDict, check_params_match, load_state_dict
from softdimo_jax.models.meissonic import TRANSFORMER_FIELDS, MeissonicTransformer, transformer_expected_params
from softdimo_jax.models.meissonic_text import MeissonicTextEncoder, meissonic_text_expected_params
from softdimo_jax.models.meissonic_vq import MeissonicVQModel, vq_expected_params

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Meissonic's own class shares diffusers' name; accept a renamed copy too.
TRANSFORMER_CLASSES = ("Transformer2DModel", "MeissonicTransformer2DModel")
VQ_CLASSES = ("VQModel",)
TEXT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _f32(a):
    return np.asarray(a, dtype=np.float32)


def _linear(w):
    return _f32(w).T


def _conv(w):
    return _f32(w).transpose(2, 3, 1, 0)


def _conv1x1(w):
    return _f32(w)[:, :, 0, 0].T


def _conv_transpose(w):
    return _f32(w).transpose(2, 3, 0, 1)


def _plain(tree):
    try:
        from flax.core import unfreeze

        return unfreeze(tree)
    except Exception:
        return tree


def _convert(s: StrictStateDict, expected: Any, rule: Callable[[tuple, tuple], tuple[str, tuple, Callable]]) -> dict:
    out = {}
    for path, spec in traverse_util.flatten_dict(_plain(expected)).items():
        key, src_shape, transform = rule(path, tuple(spec.shape))
        out[path] = s.take(key, src_shape, dtype=None, transform=transform)
    return traverse_util.unflatten_dict(out)


def _leaf(path: tuple, shape: tuple, conv1x1: bool) -> tuple[str, tuple, Callable]:
    leaf = path[-1]
    if leaf == "kernel" and len(shape) == 4:
        kh, kw, cin, cout = shape
        return "weight", (cout, cin, kh, kw), _conv
    if leaf == "kernel" and len(shape) == 2:
        cin, cout = shape
        return ("weight", (cout, cin, 1, 1), _conv1x1) if conv1x1 else ("weight", (cout, cin), _linear)
    if leaf in ("scale", "embedding"):
        return "weight", shape, _f32
    if leaf == "bias":
        return "bias", shape, _f32
    raise ValueError(f"no PyTorch layout for a Flax leaf {'/'.join(path)} of shape {shape}")


# --- transformer --------------------------------------------------------------------------
_T_TOP = {
    "embed_embeddings": "embed.embeddings", "embed_layer_norm": "embed.layer_norm", "embed_conv": "embed.conv",
    "down_norm": "down_block.downsample.norm", "down_conv": "down_block.downsample.conv",
    "up_norm": "up_block.upsample.norm", "mlm_conv1": "mlm_layer.conv1", "mlm_layer_norm": "mlm_layer.layer_norm",
    "mlm_conv2": "mlm_layer.conv2", "timestep_embedder": "time_text_embed.timestep_embedder",
    "text_embedder": "time_text_embed.text_embedder",
}
_T_CONV1X1 = ("embed_conv", "mlm_conv1", "mlm_conv2")
# Block-level Flax names -> the PyTorch submodules (AdaLN Linears, attention outputs).
_T_SEGMENT = {"attn_added": "attn", "to_out_0": "attn.to_out.0", "to_add_out": "attn.to_add_out",
              "norm1": "norm1.linear", "norm1_context": "norm1_context.linear", "norm": "norm.linear"}


def _transformer_rule(path: tuple, shape: tuple):
    if path == ("up_conv",):
        cin, cout = shape[2], shape[3]
        return "up_block.upsample.conv.weight", (cin, cout, shape[0], shape[1]), _conv_transpose
    segs = []
    for i, seg in enumerate(path[:-1]):
        m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)_(\d+)", seg)
        if m:
            segs.append(f"{m.group(1)}.{m.group(2)}")
        elif i == 0 and seg in _T_TOP:
            segs.append(_T_TOP[seg])
        elif seg in ("proj_in", "proj_out") and i > 0 and path[i - 1] in ("ff", "ff_context"):
            segs.append("net.0.proj" if seg == "proj_in" else "net.2")
        elif i == 1 and path[0].startswith(("transformer_blocks_", "single_transformer_blocks_")):
            segs.append(_T_SEGMENT.get(seg, seg))
        else:
            segs.append(seg)
    suffix, src_shape, transform = _leaf(path, shape, path[0] in _T_CONV1X1)
    return ".".join(segs + [suffix]), src_shape, transform


# Key patterns of the other Meissonic parts, to name the right --model in a refusal.
_PARTS = (
    ("mlm_layer.", "Meissonic's transformer (transformer/)", "--model meissonic_transformer"),
    ("encoder.down_blocks.", "a diffusers VQModel (vqvae/)", "--model meissonic_vqvae"),
    ("text_model.encoder.layers.", "a CLIP text encoder (text_encoder/)", "--model meissonic_text"),
)


def _refuse_other_part(sd: Mapping[str, Any], name: str, what: str, marker: str) -> None:
    if any(k.startswith(marker) for k in sd):
        return
    for pattern, other, fix in _PARTS:
        if any(k.startswith(pattern) for k in sd):
            raise ConversionError(f"{name} is not {what}, it looks like {other} — convert it with {fix}")
    raise ConversionError(f"{name} is not {what} (no '{marker}*' keys) — pass the right folder or --model")


def _indices(sd: Mapping[str, Any], prefix: str) -> set[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}


def check_transformer_state_dict(sd: Mapping[str, Any], model: MeissonicTransformer, name: str) -> None:
    """One-line refusals before the full key report: another part, or depths/widths that differ."""
    _refuse_other_part(sd, name, "a Meissonic transformer checkpoint", "mlm_layer.")
    dual = len(_indices(sd, "transformer_blocks."))
    single = len(_indices(sd, "single_transformer_blocks."))
    if (dual, single) != (model.num_layers, model.num_single_layers):
        raise ConversionError(f"{name} holds {dual} dual-stream and {single} single-stream blocks, the config asks "
                              f"for {model.num_layers} and {model.num_single_layers} — use the config.json that came "
                              "with these weights")
    emb = sd.get("embed.embeddings.weight")
    if emb is not None and tuple(emb.shape) != (model.vocab_size, model.inner_dim):
        raise ConversionError(f"{name}: embed.embeddings.weight is {tuple(emb.shape)}, the config gives "
                              f"({model.vocab_size}, {model.inner_dim}) (vocab_size, heads·head_dim) — use the "
                              "config.json that came with these weights")


def check_vq_state_dict(sd: Mapping[str, Any], model: MeissonicVQModel, name: str) -> None:
    """One-line refusals before the full key report: another part, or levels/codebook that differ."""
    _refuse_other_part(sd, name, "a VQModel checkpoint", "encoder.down_blocks.")
    levels = len(_indices(sd, "encoder.down_blocks."))
    if levels != len(model.block_out_channels):
        raise ConversionError(f"{name} has {levels} encoder levels, the config gives {len(model.block_out_channels)} "
                              "block_out_channels — use the config.json that came with these weights")
    cb = sd.get("quantize.embedding.weight")
    if cb is not None and tuple(cb.shape) != (model.num_vq_embeddings, model.embed_dim):
        raise ConversionError(f"{name}: the codebook is {tuple(cb.shape)}, the config gives "
                              f"({model.num_vq_embeddings}, {model.embed_dim}) — use the config.json that came "
                              "with these weights")


def convert_meissonic_transformer(sd: Mapping[str, np.ndarray], model: MeissonicTransformer, *,
                                  name: str = "Meissonic transformer") -> dict:
    """Meissonic `Transformer2DModel` state dict -> params of `model` (strict)."""
    check_transformer_state_dict(sd, model, name)
    s = StrictStateDict(sd, name=name)
    expected = transformer_expected_params(model)
    params = _convert(s, expected, _transformer_rule)
    s.finish()
    check_params_match(params, expected, name=name)
    return params


# --- VQ model -----------------------------------------------------------------------------
def _vq_rule(path: tuple, shape: tuple):
    if path == ("codebook",):
        return "quantize.embedding.weight", shape, _f32
    segs = []
    for seg in path[:-1]:
        m = re.fullmatch(r"(down_blocks|up_blocks)_(\d+)_(resnets|downsamplers|upsamplers)_(\d+)", seg)
        m2 = re.fullmatch(r"mid_block_resnets_(\d+)", seg)
        if m:
            segs.append(".".join(m.groups()))
        elif m2:
            segs.append(f"mid_block.resnets.{m2.group(1)}")
        else:
            segs.append("conv_shortcut" if seg == "nin_shortcut" else seg)
    conv1x1 = path[-2] in ("nin_shortcut", "quant_conv", "post_quant_conv")
    suffix, src_shape, transform = _leaf(path, shape, conv1x1)
    return ".".join(segs + [suffix]), src_shape, transform


def convert_meissonic_vq(sd: Mapping[str, np.ndarray], model: MeissonicVQModel, *,
                         name: str = "Meissonic VQ model") -> dict:
    """diffusers `VQModel` (aMUSEd layout) state dict -> params of `model` (strict)."""
    check_vq_state_dict(sd, model, name)
    s = StrictStateDict(sd, name=name)
    expected = vq_expected_params(model)
    params = _convert(s, expected, _vq_rule)
    s.finish()
    check_params_match(params, expected, name=name)
    return params


# --- text encoder ---------------------------------------------------------------------------
def convert_meissonic_text(sd: Mapping[str, np.ndarray], model: MeissonicTextEncoder, *,
                           name: str = "Meissonic text encoder") -> dict:
    """transformers `CLIPTextModelWithProjection` state dict -> params of `model` (strict)."""
    if any(k.startswith("vision_model.") for k in sd):
        raise ConversionError(f"{name} is a full CLIPModel (vision_model.* keys), not a CLIPTextModelWithProjection"
                              " — convert it with --model hfclip")
    _refuse_other_part(sd, name, "a CLIP text encoder checkpoint", "text_model.encoder.layers.")
    layers = len(_indices(sd, "text_model.encoder.layers."))
    if layers != model.layers:
        raise ConversionError(f"{name} holds {layers} text layers, the config asks for {model.layers} — use the "
                              "config.json that came with these weights")
    s = StrictStateDict(sd, name=name)
    params = hf_text_params(s, model)
    s.finish()
    check_params_match(params, meissonic_text_expected_params(model), name=name)
    return params


# --- config.json ----------------------------------------------------------------------------
def _check_class(cfg: Mapping[str, Any], allowed: tuple, what: str, path: str, hint: str) -> None:
    cls = cfg.get("_class_name")
    if cls is not None and cls not in allowed:
        raise ConversionError(f"{path} describes a {cls}, not {what} — {hint}")


def meissonic_transformer_config_from_json(cfg: Mapping[str, Any], path: str = "config.json") -> dict:
    """Module fields of MeissonicTransformer from transformer/config.json."""
    hint = "pass Meissonic's transformer/ folder with --model meissonic_transformer"
    _check_class(cfg, TRANSFORMER_CLASSES, "Meissonic's Transformer2DModel", path, hint)
    required = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "pooled_projection_dim", "vocab_size", "codebook_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConversionError(f"{path} lacks {', '.join(missing)} — it is not a Meissonic transformer config; {hint}")
    out = {k: cfg[k] for k in TRANSFORMER_FIELDS if k in cfg}
    if "axes_dims_rope" in out:
        out["axes_dims_rope"] = [int(a) for a in out["axes_dims_rope"]]
    if out.get("guidance_embeds"):
        raise ConversionError(f"{path}: guidance_embeds=true is not implemented — Meissonic's release uses false")
    if int(out.get("patch_size", 1)) != 1:
        raise ConversionError(f"{path}: patch_size {out['patch_size']} is not implemented — Meissonic uses 1")
    return out


_VQ_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
              "norm_num_groups", "num_vq_embeddings", "vq_embed_dim")


def meissonic_vq_config_from_json(cfg: Mapping[str, Any], path: str = "config.json") -> dict:
    """Module fields of MeissonicVQModel from vqvae/config.json (refuses variants not ported)."""
    hint = "pass Meissonic's vqvae/ folder with --model meissonic_vqvae"
    _check_class(cfg, VQ_CLASSES, "a diffusers VQModel", path, hint)
    missing = [k for k in ("block_out_channels", "latent_channels", "num_vq_embeddings") if k not in cfg]
    if missing:
        raise ConversionError(f"{path} lacks {', '.join(missing)} — it is not a VQModel config; {hint}")
    checks = (("norm_type", "group"), ("act_fn", "silu"), ("mid_block_add_attention", False),
              ("lookup_from_codebook", True))
    for key, want in checks:
        if key in cfg and cfg[key] != want:
            raise ConversionError(f"{path}: {key}={cfg[key]!r} is not implemented — Meissonic's VQ uses {want!r}")
    n = len(cfg["block_out_channels"])
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(key, [want] * n))
        if types != [want] * n:
            raise ConversionError(f"{path}: {key}={types} is not implemented — expected {n}×{want}")
    out = {k: cfg[k] for k in _VQ_FIELDS if k in cfg}
    out["block_out_channels"] = [int(c) for c in out["block_out_channels"]]
    return out


_TEXT_HINT = "pass Meissonic's text_encoder/ folder with --model meissonic_text"


def meissonic_text_config_from_json(cfg: Mapping[str, Any], path: str = "config.json") -> dict:
    """Module fields of MeissonicTextEncoder from text_encoder/config.json (transformers'
    CLIPTextConfig of a CLIPTextModelWithProjection)."""
    if "_class_name" in cfg:
        raise ConversionError(f"{path} describes a {cfg['_class_name']}, not a CLIP text encoder — {_TEXT_HINT}")
    if cfg.get("model_type") == "clip" or "text_config" in cfg:
        raise ConversionError(f"{path} describes a full CLIPModel (image + text), not a CLIPTextModelWithProjection"
                              " — convert it with --model hfclip")
    archs = list(cfg.get("architectures") or [])
    if archs and "CLIPTextModelWithProjection" not in archs:
        raise ConversionError(f"{path} describes a {'/'.join(archs)}, not a CLIPTextModelWithProjection (Meissonic "
                              "needs the text projection) — " + _TEXT_HINT)
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "projection_dim")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConversionError(f"{path} lacks {', '.join(missing)} — it is not a CLIP text config; {_TEXT_HINT}")
    act = cfg.get("hidden_act", "quick_gelu")  # transformers' CLIPTextConfig default
    if act not in ("gelu", "quick_gelu"):
        raise ConversionError(f"{path}: hidden_act={act!r} is not implemented — expected 'gelu' or 'quick_gelu'")
    width, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    eos = int(cfg.get("eos_token_id", 2))
    out = dict(
        vocab_size=int(cfg.get("vocab_size", 49408)),
        context_length=int(cfg.get("max_position_embeddings", 77)),
        width=width,
        heads=int(cfg["num_attention_heads"]),
        layers=int(cfg["num_hidden_layers"]),
        embed_dim=int(cfg["projection_dim"]),
        quick_gelu=act == "quick_gelu",
        # transformers: eos_token_id 2 is the legacy configs' marker -> pool at argmax(ids).
        pool_type="argmax" if eos == 2 else "eos",
        eos_id=49407 if eos == 2 else eos,
        ln_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        mlp_ratio=inter / width,
    )
    if int(round(width * out["mlp_ratio"])) != inter:
        raise ConversionError(f"{path}: intermediate_size {inter} is not representable as a ratio of {width}")
    return out


def read_folder(folder: str, from_json: Callable[[Mapping[str, Any], str], dict],
                weight_files: tuple = WEIGHT_FILES) -> tuple[dict, str]:
    """(module fields from config.json, path of the weights file) of a diffusers folder."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{folder} has no config.json — pass the diffusers folder (transformer/, vqvae/ "
                              "or text_encoder/)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{cfg_path} is not readable JSON ({e}) — re-download the folder") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{cfg_path} is not a JSON object — re-download the folder")
    fields = from_json(cfg, cfg_path)
    for name in weight_files:
        if os.path.isfile(os.path.join(folder, name)):
            return fields, os.path.join(folder, name)
    raise ConversionError(f"{folder} holds no {' or '.join(weight_files)} — download the weights next to config.json")


def transformer_folder(folder: str) -> tuple[dict, str]:
    return read_folder(folder, meissonic_transformer_config_from_json)


def vq_folder(folder: str) -> tuple[dict, str]:
    return read_folder(folder, meissonic_vq_config_from_json)


def text_folder(folder: str) -> tuple[dict, str]:
    return read_folder(folder, meissonic_text_config_from_json, TEXT_WEIGHT_FILES)


def load_meissonic_transformer(folder: str, **overrides) -> tuple[MeissonicTransformer, dict]:
    fields, weights = transformer_folder(folder)
    model = MeissonicTransformer(**{**_tuples(fields), **overrides})
    return model, convert_meissonic_transformer(load_state_dict(weights), model, name=weights)


def load_meissonic_vq(folder: str, **overrides) -> tuple[MeissonicVQModel, dict]:
    fields, weights = vq_folder(folder)
    model = MeissonicVQModel(**{**_tuples(fields), **overrides})
    return model, convert_meissonic_vq(load_state_dict(weights), model, name=weights)


def _tuples(fields: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


# --- convert-CLI registry hooks -----------------------------------------------------------
def meissonic_transformer_defaults(bits: int | None = None) -> dict:
    """Module fields of the released 1024-px Meissonic transformer (config.json wins when given)."""
    if bits is not None:
        raise ValueError("--bits does not apply to meissonic_transformer")
    m = MeissonicTransformer()
    return {f: list(getattr(m, f)) if isinstance(getattr(m, f), tuple) else getattr(m, f) for f in TRANSFORMER_FIELDS}


def meissonic_vq_defaults(bits: int | None = None) -> dict:
    """Module fields of Meissonic's VQ model (f16, 8192 codes; config.json wins when given)."""
    if bits is not None:
        raise ValueError("--bits does not apply to meissonic_vqvae")
    m = MeissonicVQModel()
    return {f: list(getattr(m, f)) if isinstance(getattr(m, f), tuple) else getattr(m, f) for f in _VQ_FIELDS}


def meissonic_text_defaults(bits: int | None = None) -> dict:
    """Module fields of the CLIP-ViT-H-14 text encoder (config.json wins when given)."""
    if bits is not None:
        raise ValueError("--bits does not apply to meissonic_text")
    m = MeissonicTextEncoder()
    return dict(vocab_size=m.vocab_size, context_length=m.context_length, width=m.width, heads=m.heads,
                layers=m.layers, embed_dim=m.embed_dim, quick_gelu=m.quick_gelu, pool_type=m.pool_type,
                eos_id=m.eos_id, ln_eps=m.ln_eps, mlp_ratio=m.mlp_ratio)
