"""PyTorch state dicts -> Flax params for Di[M]O's MaskGIT teacher and the taming VQGAN.

Both converters are driven by the Flax module's own parameter tree (jax.eval_shape, nothing
allocated): every target parameter is looked up under its PyTorch name with the PyTorch
shape checked first, every source key must be used, and any problem raises one
`ConversionError` listing all of them. Layouts: Linear (out, in) -> kernel (in, out);
Conv2d (out, in, kh, kw) -> kernel (kh, kw, in, out); the VQGAN's 1x1 convs (q, k, v,
proj_out, nin_shortcut, quant_conv, post_quant_conv) are Dense layers here:
(out, in, 1, 1) -> (in, out). torch MultiheadAttention's packed `in_proj_weight` keeps its
q, k, v order along the Dense output axis.

Checkpoints users bring: `MaskGIT_ImageNet_256.pth` (weights under `model_state_dict`;
DDP's `module.` prefix is stripped) and the taming VQGAN's Lightning `last.ckpt` (weights
under `state_dict`; its `loss.*` entries, the discriminator and LPIPS, are not part of the
model: they are skipped explicitly and reported, never silently).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from softdimo_jax.conversion.state_dict import (
    StrictStateDict,
    check_params_match,
    load_state_dict,
)
from softdimo_jax.models.maskgit import IMAGENET256_CFG, MaskGITTransformer, maskgit_expected_params
from softdimo_jax.models.taming_vqgan import (IMAGENET_F16_1024_CFG, TamingVQModel, taming_vqgan_from_cfg,
                                              vqgan_expected_params)

log = logging.getLogger(__name__)

# Lightning checkpoints of taming VQGANs also hold the training loss modules.
VQGAN_IGNORE_PREFIXES = ("loss.",)


# --- layout transforms ------------------------------------------------------------------
def _linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _conv(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _conv1x1(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w[:, :, 0, 0].T)


def _source_layout(leaf: str, shape: tuple, dense_is_conv1x1: bool) -> tuple[str, tuple, Callable | None]:
    """(torch suffix, torch shape, transform) for one Flax leaf."""
    if leaf == "kernel" and len(shape) == 4:
        kh, kw, cin, cout = shape
        return "weight", (cout, cin, kh, kw), _conv
    if leaf == "kernel" and len(shape) == 2:
        cin, cout = shape
        if dense_is_conv1x1:
            return "weight", (cout, cin, 1, 1), _conv1x1
        return "weight", (cout, cin), _linear
    if leaf in ("scale", "embedding"):
        return "weight", tuple(shape), None
    if leaf == "bias":
        return "bias", tuple(shape), None
    raise ValueError(f"no PyTorch layout rule for a Flax leaf {leaf!r} of shape {shape}")


def _convert(s: StrictStateDict, expected: Any, source_key: Callable[[tuple[str, ...]], str | None],
             module_name: Callable[[tuple[str, ...]], str], dense_is_conv1x1: bool) -> dict:
    """Fills every leaf of `expected` (a param-shape tree) from `s`.

    `source_key(path)` names parameters whose PyTorch key is not `<module>.<weight|bias>`
    (taken as they are); otherwise `module_name(path[:-1])` gives the PyTorch module.
    """
    out = {}
    for path, spec in traverse_util.flatten_dict(_plain(expected)).items():
        shape = tuple(spec.shape)
        key = source_key(path)
        if key is not None:
            transform = _linear if key.endswith("in_proj_weight") else None
            out[path] = s.take(key, shape[::-1] if transform else shape, transform=transform)
            continue
        suffix, src_shape, transform = _source_layout(path[-1], shape, dense_is_conv1x1)
        out[path] = s.take(module_name(path[:-1]) + "." + suffix, src_shape, transform=transform)
    return traverse_util.unflatten_dict(out)


def _plain(tree):
    try:
        from flax.core import unfreeze

        return unfreeze(tree)
    except Exception:
        return tree


# --- MaskGIT transformer ----------------------------------------------------------------
_MASKGIT_TOP = {
    "tok_emb": "tok_emb",
    "first_norm_0": "first_layer.0",
    "first_dense_0": "first_layer.2",
    "first_norm_1": "first_layer.4",
    "first_dense_1": "first_layer.6",
    "last_norm_0": "last_layer.0",
    "last_dense": "last_layer.2",
    "last_norm_1": "last_layer.4",
}
_MASKGIT_LAYER = {
    ("attn_norm",): "0.norm",
    ("attn", "out_proj"): "0.fn.mha.out_proj",
    ("mlp_norm",): "1.norm",
    ("mlp_fc1",): "1.fn.net.0",
    ("mlp_fc2",): "1.fn.net.3",
}


def _maskgit_source_key(path: tuple[str, ...]) -> str | None:
    # Bare parameters, and torch MHA's packed projection (in_proj_weight / in_proj_bias).
    if path in (("pos_emb",), ("bias",)):
        return path[0]
    m = re.fullmatch(r"layer_(\d+)", path[0])
    if m and path[1:3] == ("attn", "in_proj"):
        return f"transformer.layers.{m.group(1)}.0.fn.mha.in_proj_" + ("weight" if path[3] == "kernel" else "bias")
    return None


def _maskgit_module_name(path: tuple[str, ...]) -> str:
    if len(path) == 1 and path[0] in _MASKGIT_TOP:
        return _MASKGIT_TOP[path[0]]
    m = re.fullmatch(r"layer_(\d+)", path[0])
    if m and tuple(path[1:]) in _MASKGIT_LAYER:
        return f"transformer.layers.{m.group(1)}." + _MASKGIT_LAYER[tuple(path[1:])]
    raise ValueError(f"no PyTorch name for MaskGIT module {'/'.join(path)}")


def convert_maskgit_transformer(
    sd: Mapping[str, np.ndarray], model: MaskGITTransformer, *, name: str = "MaskGIT transformer"
) -> dict:
    """Di[M]O / MaskGIT-pytorch `MaskTransformer` state dict -> params of `model` (strict).

    `sd` is the flat state dict (the `.pth` file's `model_state_dict`, or Di[M]O's
    `pytorch_model.bin`); a DDP `module.` prefix is stripped.
    """
    s = StrictStateDict(sd, name=name, strip_prefixes=("module.",))
    expected = maskgit_expected_params(model)
    params = _convert(s, expected, _maskgit_source_key, _maskgit_module_name, dense_is_conv1x1=False)
    s.finish()
    check_params_match(params, expected, name=name)
    return params


# --- taming VQGAN -----------------------------------------------------------------------
def _vqgan_segment(seg: str) -> str:
    m = re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", seg)
    if m:
        return ".".join(m.groups())
    m = re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", seg)
    if m:
        return ".".join(m.groups())
    m = re.fullmatch(r"mid_(block_1|attn_1|block_2)", seg)
    if m:
        return "mid." + m.group(1)
    return seg


def _vqgan_source_key(path: tuple[str, ...]) -> str | None:
    return "quantize.embedding.weight" if path == ("codebook",) else None


def _vqgan_module_name(path: tuple[str, ...]) -> str:
    return ".".join(_vqgan_segment(seg) for seg in path)


def convert_taming_vqgan(
    sd: Mapping[str, np.ndarray],
    model: TamingVQModel,
    *,
    name: str = "taming VQGAN",
    return_ignored: bool = False,
):
    """taming `VQModel` (VectorQuantizer2) state dict -> params of `model` (strict).

    Lightning's `loss.*` keys (discriminator, LPIPS) are skipped and reported in the log;
    with `return_ignored=True` the result is `(params, ignored_keys)`. Every other key
    must belong to the model.
    """
    s = StrictStateDict(sd, name=name, ignore_prefixes=VQGAN_IGNORE_PREFIXES)
    expected = vqgan_expected_params(model)
    params = _convert(s, expected, _vqgan_source_key, _vqgan_module_name, dense_is_conv1x1=True)
    s.finish()
    check_params_match(params, expected, name=name)
    if s.ignored:
        groups = sorted({".".join(k.split(".")[:2]) for k in s.ignored})
        log.warning("%s: skipped %d keys of the training loss (%s), not part of the model", name,
                    len(s.ignored), ", ".join(groups))
    if return_ignored:
        return params, list(s.ignored)
    return params


# --- convert-CLI registry hooks (softdimo_jax.convert.FAMILIES) ----------------------
def maskgit_transformer_defaults(bits: int | None = None) -> dict:
    """Module fields of Di[M]O's ImageNet-256 MaskGIT teacher (`bits` does not apply)."""
    if bits is not None:
        raise ValueError("--bits does not apply to maskgit_transformer (use --set codebook_size=...)")
    return dict(IMAGENET256_CFG)


def taming_vqgan_defaults(bits: int | None = None) -> dict:
    """Module fields of taming's ImageNet f16-1024 VQGAN (`bits` does not apply)."""
    if bits is not None:
        raise ValueError("--bits does not apply to taming_vqgan (use --set n_embed=...)")
    m = taming_vqgan_from_cfg(IMAGENET_F16_1024_CFG)
    fields = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_channels",
              "resolution", "z_channels", "double_z", "n_embed", "embed_dim", "resamp_with_conv", "tanh_out")
    return {f: list(getattr(m, f)) if isinstance(getattr(m, f), tuple) else getattr(m, f) for f in fields}


# --- file loaders -----------------------------------------------------------------------
def load_maskgit_transformer(path: str, model: MaskGITTransformer, *, subkey: str | None = None) -> dict:
    """Reads a MaskGIT checkpoint (`.pth` with `model_state_dict`, a plain state dict
    `.bin`, `.safetensors` or `.npz`) and converts it for `model`."""
    sd = load_state_dict(path, subkey=subkey)
    return convert_maskgit_transformer(sd, model, name=f"MaskGIT transformer {os.path.basename(path)}")


def load_taming_vqgan(path: str, model: TamingVQModel, *, subkey: str | None = None,
                      return_ignored: bool = False):
    """Reads a taming VQGAN checkpoint (Lightning `last.ckpt` with `state_dict`, or a flat
    state dict) and converts it for `model`; `loss.*` keys are skipped and reported."""
    if subkey is None and path.lower().endswith(".ckpt"):
        subkey = "state_dict"
    sd = load_state_dict(path, subkey=subkey)
    return convert_taming_vqgan(sd, model, name=f"taming VQGAN {os.path.basename(path)}",
                                return_ignored=return_ignored)


def taming_vqgan_from_yaml(path: str, **overrides) -> TamingVQModel:
    """Builds the VQGAN from taming's `model.yaml` (model.params: ddconfig, n_embed, embed_dim)."""
    import yaml  # optional dependency, needed for this file format only

    with open(path) as f:
        tree = yaml.safe_load(f)
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: not a taming model.yaml (expected a mapping with model.params)")
    return taming_vqgan_from_cfg(tree, **overrides)
