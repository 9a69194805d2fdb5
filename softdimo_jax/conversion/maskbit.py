"""MaskBit PyTorch state dicts -> Flax params for `LFQBert` and `ConvVQModel`.

Both converters are strict: every source key is used (or deliberately skipped, after a
check), every target parameter is filled, shapes are checked on the PyTorch layout, and
any problem raises one `ConversionError` listing all of them. Layout changes:
Linear (out, in) -> kernel (in, out); Conv2d (out, in, kh, kw) -> kernel (kh, kw, in, out);
torch MultiheadAttention's packed `in_proj_weight` (3d, d) -> one Dense kernel (d, 3d)
whose output axis keeps torch's q, k, v order.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.state_dict import (
    ConversionError,
    StrictStateDict,
    check_params_match,
)
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.models.maskbit_tokenizer import ConvVQModel

# Older MaskBit checkpoints call the bit projection `token_emb`.
BERT_ALIASES = {"token_emb.": "input_proj."}
# Wrappers a saved state dict may carry: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _linear_t(w: np.ndarray, block: int = 256) -> np.ndarray:
    """(out, in) -> contiguous (in, out), transposed in row blocks (several times faster
    than one strided copy for the 4096 x 1024 matrices of the full model)."""
    out = np.empty((w.shape[1], w.shape[0]), w.dtype)
    for i in range(0, w.shape[0], block):
        out[:, i : i + block] = w[i : i + block].T
    return out


def _conv_t(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _dense(sd: StrictStateDict, prefix: str, n_in: int, n_out: int, bias: bool = True) -> dict:
    out = {"kernel": sd.take(prefix + ".weight", (n_out, n_in), transform=_linear_t)}
    if bias:
        out["bias"] = sd.take(prefix + ".bias", (n_out,))
    return out


def _norm(sd: StrictStateDict, prefix: str, n: int) -> dict:
    return {"scale": sd.take(prefix + ".weight", (n,)), "bias": sd.take(prefix + ".bias", (n,))}


def _check_bits_buffer(sd: StrictStateDict, key: str, n_bits: int) -> None:
    """MaskBit stores `bits_to_indices` = 2**arange(n) as a buffer; we recompute it, so a
    checkpoint whose buffer says otherwise belongs to a different bit layout."""
    if key not in sd:
        return  # buffers are optional (non-persistent in some exports)
    arr = sd.take(key, (n_bits,), dtype=np.int64)
    if arr is not None and not np.array_equal(arr, 2 ** np.arange(n_bits)):
        raise ConversionError(f"{sd.name}: {key} = {arr.tolist()} is not 2**arange({n_bits})")


def expected_params(model, *example_args, method=None) -> Any:
    """Param shapes of `model` without allocating them."""
    rngs = {"params": jax.random.PRNGKey(0)}
    variables = jax.eval_shape(lambda: model.init(rngs, *example_args, method=method))
    return variables["params"]


def bert_expected_params(model: LFQBert) -> Any:
    tokens = jnp.zeros((1, model.num_tokens, model.splits), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32)
    return expected_params(model, tokens, labels)


def convert_maskbit_bert(sd: Mapping[str, np.ndarray], model: LFQBert, *, name: str = "maskbit generator") -> dict:
    """MaskBit `LFQBert` state dict -> params of `model` (strict)."""
    s = StrictStateDict(sd, name=name, aliases=BERT_ALIASES, strip_prefixes=WRAPPER_PREFIXES)
    d, L, bits = model.hidden_dim, model.num_tokens, model.num_bits
    p: dict[str, Any] = {
        "input_proj": _dense(s, "input_proj", bits, d),
        "class_emb": {"embedding": s.take("class_emb.weight", (model.num_classes + 1, d))},
        "pos_emb": s.take("pos_emb", (1, L + 1, d)),
        "first_norm": _norm(s, "first_layer.0", d),
        "last_dense": _dense(s, "last_layer.0", d, d),
        "last_norm": _norm(s, "last_layer.2", d),
        "prediction": _dense(s, "prediction_layer", d, model.splits * model.vocab_size),
    }
    if model.use_prenorm:
        p["final_norm"] = _norm(s, "norm_after_transformer", d)
    for i in range(model.depth):
        t = f"transformer.layers.{i}"
        p[f"layer_{i}"] = {
            "attn": {
                "in_proj": {
                    "kernel": s.take(f"{t}.0.mha.in_proj_weight", (3 * d, d), transform=_linear_t),
                    "bias": s.take(f"{t}.0.mha.in_proj_bias", (3 * d,)),
                },
                "out_proj": _dense(s, f"{t}.0.mha.out_proj", d, d),
            },
            "attn_norm": _norm(s, f"{t}.0.norm", d),
            "mlp_fc1": _dense(s, f"{t}.1.net.0", d, model.mlp_dim),
            "mlp_fc2": _dense(s, f"{t}.1.net.2", model.mlp_dim, d),
            "mlp_norm": _norm(s, f"{t}.1.norm", d),
        }
    _check_bits_buffer(s, "bits_to_indices", model.bits_per_split)
    s.finish()
    check_params_match(p, bert_expected_params(model), name=name)
    return p


# --------------------------------------------------------------------------- tokenizer


def tokenizer_expected_params(model: ConvVQModel) -> Any:
    hw = model.downsample_factor
    images = jnp.zeros((1, hw, hw, model.num_channels), jnp.float32)
    return expected_params(model, images)


def _res_block(s: StrictStateDict, prefix: str, c_in: int, c_out: int) -> dict:
    p = {
        "norm1": _norm(s, prefix + ".norm1", c_in),
        "conv1": {"kernel": s.take(prefix + ".conv1.weight", (c_out, c_in, 3, 3), transform=_conv_t)},
        "norm2": _norm(s, prefix + ".norm2", c_out),
        "conv2": {"kernel": s.take(prefix + ".conv2.weight", (c_out, c_out, 3, 3), transform=_conv_t)},
    }
    if c_in != c_out:
        p["nin_shortcut"] = {
            "kernel": s.take(prefix + ".nin_shortcut.weight", (c_out, c_out, 1, 1), transform=_conv_t)
        }
    return p


def _conv(s: StrictStateDict, prefix: str, c_in: int, c_out: int, k: int, bias: bool = True) -> dict:
    p = {"kernel": s.take(prefix + ".weight", (c_out, c_in, k, k), transform=_conv_t)}
    if bias:
        p["bias"] = s.take(prefix + ".bias", (c_out,))
    return p


def _stage(s: StrictStateDict, prefix: str, c_in: int, c_out: int, n_blocks: int) -> dict:
    p = {}
    for j in range(n_blocks):
        p[f"res_blocks_{j}"] = _res_block(s, f"{prefix}.res_blocks.{j}", c_in, c_out)
        c_in = c_out
    return p


def convert_maskbit_tokenizer(
    sd: Mapping[str, np.ndarray], model: ConvVQModel, *, name: str = "maskbit tokenizer"
) -> dict:
    """MaskBit `ConvVQModel` (lookup-free) state dict -> params of `model` (strict)."""
    s = StrictStateDict(sd, name=name, strip_prefixes=WRAPPER_PREFIXES)
    enc_plan, dec_plan = model.stage_plan()
    h = model.hidden_channels
    enc: dict[str, Any] = {"conv_in": _conv(s, "encoder.conv_in", model.num_channels, h, 3, bias=False)}
    for i, (c_in, c_out, resample) in enumerate(enc_plan["stages"]):
        st = _stage(s, f"encoder.down.{i}", c_in, c_out, model.num_res_blocks)
        if resample == "down_conv":  # "avg_pool" stages have no parameters
            st["down_conv"] = _conv(s, f"encoder.down.{i}.down_conv", c_out, c_out, 3)
        enc[f"down_{i}"] = st
    mid = enc_plan["mid"]
    enc["mid"] = _stage(s, "encoder.mid", mid, mid, model.num_res_blocks)
    enc["norm_out"] = _norm(s, "encoder.norm_out", mid)
    enc["conv_out"] = _conv(s, "encoder.conv_out", mid, model.num_bits, 1)

    nd = model.decoder_res_blocks
    block_in = dec_plan["block_in"]
    dec: dict[str, Any] = {"conv_in": _conv(s, "decoder.conv_in", model.num_bits, block_in, 3)}
    dec["mid"] = _stage(s, "decoder.mid", block_in, block_in, nd)
    for i, (c_in, c_out, resample) in enumerate(dec_plan["stages"]):
        st = _stage(s, f"decoder.up.{i}", c_in, c_out, nd)
        if resample == "up":
            st["upsample_conv"] = _conv(s, f"decoder.up.{i}.upsample_conv", c_out, c_out, 3)
        dec[f"up_{i}"] = st
    c_last = dec_plan["stages"][-1][1]
    dec["norm_out"] = _norm(s, "decoder.norm_out", c_last)
    dec["conv_out"] = _conv(s, "decoder.conv_out", c_last, model.num_channels, 3)

    # The quantiser's buffers are recomputed; check they describe the same bit layout.
    _check_bits_buffer(s, "quantize.bits_to_indices", model.num_bits)
    if "quantize.codebook" in s:
        cb = s.take("quantize.codebook", (2**model.num_bits, model.num_bits))
        if cb is not None and cb.shape == (2**model.num_bits, model.num_bits):
            want = 2.0 * ((np.arange(2**model.num_bits)[:, None] >> np.arange(model.num_bits)) & 1) - 1.0
            if not np.array_equal(cb, want):
                raise ConversionError(f"{name}: quantize.codebook is not the LFQ ±1 bit table")
    s.finish()
    p = {"encoder": enc, "decoder": dec}
    check_params_match(p, tokenizer_expected_params(model), name=name)
    return p


def maskbit_generator_defaults(bits: int | None) -> dict:
    """MaskBit's released generator size (configs/maskbit.py holds the same numbers)."""
    bits = 14 if bits is None else int(bits)
    return dict(num_tokens=256, num_bits=bits, splits=2, hidden_dim=1024, depth=24, heads=16,
                mlp_dim=4096, num_classes=1000, dropout=0.1, use_prenorm=False)


def maskbit_tokenizer_defaults(bits: int | None) -> dict:
    """MaskBit's released tokenizer size (configs/maskbit.py holds the same numbers)."""
    bits = 14 if bits is None else int(bits)
    return dict(num_bits=bits, hidden_channels=128, channel_mult=[1, 1, 2, 2, 4],
                num_res_blocks=2, num_channels=3, sample_with_conv=True)
