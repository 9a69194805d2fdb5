"""MaskGen-family PyTorch state dicts -> Flax params: `MaskGen_VQ`, TA-TiTok (VQ) and the
OpenCLIP text tower.

All converters are strict (every source key used or deliberately skipped, every target
filled, shapes checked on the PyTorch layout; one `ConversionError` lists every problem).
Layouts: Linear (out, in) -> kernel (in, out); Conv2d (out, in, kh, kw) -> (kh, kw, in, out);
torch MultiheadAttention's packed `in_proj_weight` (3d, d) -> one Dense kernel (d, 3d) with
torch's q, k, v order on the output axis.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.state_dict import ConversionError, StrictStateDict, check_params_match
from softdimo_jax.models.maskgen import MaskGenVQ


def _linear_t(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _conv_t(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _dense(sd: StrictStateDict, prefix: str, n_in: int, n_out: int, bias: bool = True) -> dict:
    out = {"kernel": sd.take(prefix + ".weight", (n_out, n_in), transform=_linear_t)}
    if bias:
        out["bias"] = sd.take(prefix + ".bias", (n_out,))
    return out


def _conv(sd: StrictStateDict, prefix: str, n_in: int, n_out: int, k: int) -> dict:
    return {
        "kernel": sd.take(prefix + ".weight", (n_out, n_in, k, k), transform=_conv_t),
        "bias": sd.take(prefix + ".bias", (n_out,)),
    }


def _norm(sd: StrictStateDict, prefix: str, n: int) -> dict:
    return {"scale": sd.take(prefix + ".weight", (n,)), "bias": sd.take(prefix + ".bias", (n,))}


def _expected(model, *args, method=None) -> Any:
    rngs = {"params": jax.random.PRNGKey(0)}
    return jax.eval_shape(lambda: model.init(rngs, *args, method=method))["params"]


# ----------------------------------------------------------------------------------------
# MaskGen-VQ


def maskgen_expected_params(model: MaskGenVQ) -> Any:
    b = 1
    tokens = jnp.zeros((b, model.seq_len), jnp.int32)
    cond = jnp.zeros((b, 77, model.text_embed_dim), jnp.float32)
    pooled = jnp.zeros((b, 1, model.text_embed_dim), jnp.float32)
    score = jnp.zeros((b,), jnp.float32)
    return _expected(model, tokens, cond, pooled, score)


def convert_maskgen_vq(sd: Mapping[str, np.ndarray], model: MaskGenVQ, *, name: str = "maskgen_vq") -> dict:
    """MaskGen `MaskGen_VQ` state dict -> params of `model` (strict).

    The weight-tied `lm_head.weight` is the embedding table itself: it may be absent from a
    saved file; when present it must equal `embeddings.weight` (else the checkpoint is not
    weight-tied and the model must be built with weight_tying=False).
    """
    s = StrictStateDict(sd, name=name)
    d, tw = model.embed_dim, model.text_embed_dim
    pooled_in = tw + (model.micro_condition_embed_dim if model.micro_condition else 0)
    emb = s.take("embeddings.weight", (model.num_embeddings, d))
    p: dict[str, Any] = {
        "embeddings": {"embedding": emb},
        "pos_embed": s.take("pos_embed", (1, model.seq_len, d)),
        "text_embed_proj": _dense(s, "text_embed_proj", tw, d),
        "cond_pooled_proj": _dense(s, "cond_pooled_proj", pooled_in, d),
        "norm": _dense(s, "norm.linear", d, 2 * d),
    }
    for i in range(model.depth):
        last = i == model.depth - 1
        pre = f"blocks.{i}."
        attn = {
            "to_q": _dense(s, pre + "attn.to_q", d, d),
            "to_k": _dense(s, pre + "attn.to_k", d, d),
            "to_v": _dense(s, pre + "attn.to_v", d, d),
            "add_q_proj": _dense(s, pre + "attn.add_q_proj", d, d),
            "add_k_proj": _dense(s, pre + "attn.add_k_proj", d, d),
            "add_v_proj": _dense(s, pre + "attn.add_v_proj", d, d),
            "to_out": _dense(s, pre + "attn.to_out.0", d, d),
        }
        blk = {
            "norm1": _dense(s, pre + "norm1.linear", d, 6 * d),
            "norm1_context": _dense(s, pre + "norm1_context.linear", d, (2 if last else 6) * d),
            "attn": attn,
            "ff": {
                "proj_in": _dense(s, pre + "ff.net.0.proj", d, 4 * d),
                "proj_out": _dense(s, pre + "ff.net.2", 4 * d, d),
            },
        }
        if not last:
            attn["to_add_out"] = _dense(s, pre + "attn.to_add_out", d, d)
            blk["ff_context"] = {
                "proj_in": _dense(s, pre + "ff_context.net.0.proj", d, 4 * d),
                "proj_out": _dense(s, pre + "ff_context.net.2", 4 * d, d),
            }
        p[f"blocks_{i}"] = blk
    if model.weight_tying:
        if "lm_head.weight" in s:
            head = s.take("lm_head.weight", (model.num_embeddings, d))
            if head is not None and emb is not None and head.shape == emb.shape and not np.array_equal(head, emb):
                raise ConversionError(
                    f"{name}: lm_head.weight differs from embeddings.weight, so the checkpoint is not "
                    "weight-tied; build the model with weight_tying=False"
                )
    else:
        p["lm_head"] = _dense(s, "lm_head", d, model.codebook_size)
    s.finish()
    check_params_match(p, maskgen_expected_params(model), name=name)
    return p


# ----------------------------------------------------------------------------------------
# Transformer blocks shared by the OpenCLIP text tower and the TA-TiTok ViTs


def _resblock(s: StrictStateDict, pre: str, w: int, mlp_ratio: float = 4.0) -> dict:
    h = int(w * mlp_ratio)
    return {
        "ln_1": _norm(s, pre + "ln_1", w),
        "attn": {
            "in_proj": {
                "kernel": s.take(pre + "attn.in_proj_weight", (3 * w, w), transform=_linear_t),
                "bias": s.take(pre + "attn.in_proj_bias", (3 * w,)),
            },
            "out_proj": _dense(s, pre + "attn.out_proj", w, w),
        },
        "ln_2": _norm(s, pre + "ln_2", w),
        "c_fc": _dense(s, pre + "mlp.c_fc", w, h),
        "c_proj": _dense(s, pre + "mlp.c_proj", h, w),
    }


# ----------------------------------------------------------------------------------------
# OpenCLIP text tower


def clip_text_expected_params(model) -> Any:
    return _expected(model, jnp.zeros((1, model.context_length), jnp.int32))


def convert_clip_text(
    sd: Mapping[str, np.ndarray],
    model,
    *,
    name: str = "openclip text",
    ignore_prefixes=("visual.",),
    strip_prefixes=(),
) -> dict:
    """OpenCLIP `CLIP` text-tower keys -> params of a ClipTextTransformer (strict).

    A full CLIP state dict is accepted: its image tower (`visual.*`) is ignored (listed in
    the StrictStateDict's `ignored`), `logit_scale` is skipped. `strip_prefixes` removes a
    wrapper prefix (e.g. "text." for CustomTextCLIP exports, "module.")."""
    s = StrictStateDict(sd, name=name, ignore_prefixes=ignore_prefixes, strip_prefixes=strip_prefixes)
    w = model.width
    p: dict[str, Any] = {
        "token_embedding": {"embedding": s.take("token_embedding.weight", (model.vocab_size, w))},
        "positional_embedding": s.take("positional_embedding", (model.context_length, w)),
        "ln_final": _norm(s, "ln_final", w),
        "text_projection": s.take("text_projection", (w, model.embed_dim)),
    }
    for i in range(model.layers):
        p[f"resblocks_{i}"] = _resblock(s, f"transformer.resblocks.{i}.", w)
    s.skip("logit_scale", "attn_mask", "logit_bias")
    s.finish()
    check_params_match(p, clip_text_expected_params(model), name=name)
    return p
