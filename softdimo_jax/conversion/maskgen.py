"""MaskGen-family PyTorch state dicts -> Flax params: `MaskGen_VQ`, TA-TiTok (VQ) and the
OpenCLIP text tower.

All converters are strict (every source key used or deliberately skipped, every target
filled, shapes checked on the PyTorch layout; one `ConversionError` lists every problem).
Layouts: Linear (out, in) -> kernel (in, out); Conv2d (out, in, kh, kw) -> (kh, kw, in, out);
torch MultiheadAttention's packed `in_proj_weight` (3d, d) -> one Dense kernel (d, 3d) with
torch's q, k, v order on the output axis. Float32 sources are not copied: the returned
arrays may be transposed views of the checkpoint's arrays (other dtypes are cast once).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.state_dict import ConversionError, StrictStateDict, check_params_match
from softdimo_jax.models.maskgen import MaskGenVQ


def _f32(a: np.ndarray) -> np.ndarray:
    # No copy for float32 sources (a 600M-parameter checkpoint stays a set of views).
    return np.asarray(a, dtype=np.float32)


def _linear_t(w: np.ndarray) -> np.ndarray:
    return _f32(w).T


def _conv_t(w: np.ndarray) -> np.ndarray:
    return _f32(w).transpose(2, 3, 1, 0)


def _take(sd: StrictStateDict, key: str, shape, transform=_f32) -> np.ndarray:
    return sd.take(key, shape, dtype=None, transform=transform)


def _dense(sd: StrictStateDict, prefix: str, n_in: int, n_out: int, bias: bool = True) -> dict:
    out = {"kernel": _take(sd, prefix + ".weight", (n_out, n_in), _linear_t)}
    if bias:
        out["bias"] = _take(sd, prefix + ".bias", (n_out,))
    return out


def _conv(sd: StrictStateDict, prefix: str, n_in: int, n_out: int, k: int) -> dict:
    return {
        "kernel": _take(sd, prefix + ".weight", (n_out, n_in, k, k), _conv_t),
        "bias": _take(sd, prefix + ".bias", (n_out,)),
    }


def _norm(sd: StrictStateDict, prefix: str, n: int) -> dict:
    return {"scale": _take(sd, prefix + ".weight", (n,)), "bias": _take(sd, prefix + ".bias", (n,))}


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
    emb = _take(s, "embeddings.weight", (model.num_embeddings, d))
    p: dict[str, Any] = {
        "embeddings": {"embedding": emb},
        "pos_embed": _take(s, "pos_embed", (1, model.seq_len, d)),
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
            head = _take(s, "lm_head.weight", (model.num_embeddings, d))
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


def openclip_resblock_params(s: StrictStateDict, pre: str, w: int, mlp_ratio: float = 4.0) -> dict:
    """One open_clip `ResidualAttentionBlock` (packed in_proj) -> its Flax params."""
    h = int(round(w * mlp_ratio))
    return {
        "ln_1": _norm(s, pre + "ln_1", w),
        "attn": {
            "in_proj": {
                "kernel": _take(s, pre + "attn.in_proj_weight", (3 * w, w), _linear_t),
                "bias": _take(s, pre + "attn.in_proj_bias", (3 * w,)),
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
    p = openclip_text_params(s, model)
    s.skip("logit_scale", "attn_mask", "logit_bias")
    s.finish()
    check_params_match(p, clip_text_expected_params(model), name=name)
    return p


def openclip_text_params(s: StrictStateDict, model) -> dict:
    """The text-tower keys of an OpenCLIP `CLIP` state dict (top level: `token_embedding`,
    `positional_embedding`, `transformer.resblocks.*`, `ln_final`, `text_projection`)."""
    w = model.width
    p: dict[str, Any] = {
        "token_embedding": {"embedding": _take(s, "token_embedding.weight", (model.vocab_size, w))},
        "positional_embedding": _take(s, "positional_embedding", (model.context_length, w)),
        "ln_final": _norm(s, "ln_final", w),
        "text_projection": _take(s, "text_projection", (w, model.embed_dim)),
    }
    for i in range(model.layers):
        p[f"resblocks_{i}"] = openclip_resblock_params(s, f"transformer.resblocks.{i}.", w, model.mlp_ratio)
    return p


# ----------------------------------------------------------------------------------------
# TA-TiTok (VQ)


def tatitok_expected_params(model) -> Any:
    images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    text = jnp.zeros((1, model.text_context_length, model.text_embed_dim), jnp.float32)
    return _expected(model, images, text)


def convert_tatitok(sd: Mapping[str, np.ndarray], model, *, name: str = "tatitok") -> dict:
    """TA-TiTok (VQ, non-legacy) state dict -> params of a TATiTok (strict).

    `quantize.embed_prob` (the clustering-VQ usage statistics, a training-time buffer) is
    skipped when present."""
    s = StrictStateDict(sd, name=name)
    ew, dw, C = model.enc_width, model.dec_width, model.token_size
    L, K = model.num_latent_tokens, model.codebook_size
    ge = (model.image_size // model.enc_patch_size) ** 2
    gd = (model.image_size // model.dec_patch_size) ** 2
    pe, pd = model.enc_patch_size, model.dec_patch_size
    enc = {
        "patch_embed": _conv(s, "encoder.patch_embed", 3, ew, pe),
        "class_embedding": _take(s, "encoder.class_embedding", (1, ew)),
        "positional_embedding": _take(s, "encoder.positional_embedding", (ge + 1, ew)),
        "latent_token_positional_embedding": _take(s, "encoder.latent_token_positional_embedding", (L, ew)),
        "ln_pre": _norm(s, "encoder.ln_pre", ew),
        "ln_post": _norm(s, "encoder.ln_post", ew),
        # 1×1 conv over the width -> Dense
        "conv_out": {
            "kernel": _take(s, "encoder.conv_out.weight", (C, ew, 1, 1), lambda w: _linear_t(w[:, :, 0, 0])),
            "bias": _take(s, "encoder.conv_out.bias", (C,)),
        },
    }
    for i in range(model.enc_layers):
        enc[f"transformer_{i}"] = openclip_resblock_params(s, f"encoder.transformer.{i}.", ew)
    dec = {
        "decoder_embed": _dense(s, "decoder.decoder_embed", C, dw),
        "class_embedding": _take(s, "decoder.class_embedding", (1, dw)),
        "positional_embedding": _take(s, "decoder.positional_embedding", (gd + 1, dw)),
        "mask_token": _take(s, "decoder.mask_token", (1, 1, dw)),
        "latent_token_positional_embedding": _take(s, "decoder.latent_token_positional_embedding", (L, dw)),
        "text_guidance_proj": _dense(s, "decoder.text_guidance_proj", model.text_embed_dim, dw),
        "text_guidance_positional_embedding": _take(
            s, "decoder.text_guidance_positional_embedding", (model.text_context_length, dw)
        ),
        "ln_pre": _norm(s, "decoder.ln_pre", dw),
        "ln_post": _norm(s, "decoder.ln_post", dw),
        "ffn": {
            "kernel": _take(s, "decoder.ffn.0.weight", (pd * pd * 3, dw, 1, 1), lambda w: _linear_t(w[:, :, 0, 0])),
            "bias": _take(s, "decoder.ffn.0.bias", (pd * pd * 3,)),
        },
        "conv_out": _conv(s, "decoder.conv_out", 3, 3, 3),
    }
    for i in range(model.dec_layers):
        dec[f"transformer_{i}"] = openclip_resblock_params(s, f"decoder.transformer.{i}.", dw)
    p = {
        "latent_tokens": _take(s, "latent_tokens", (L, ew)),
        "encoder": enc,
        "decoder": dec,
        "quantize": {"embedding": _take(s, "quantize.embedding.weight", (K, C))},
    }
    s.skip("quantize.embed_prob")
    s.finish()
    check_params_match(p, tatitok_expected_params(model), name=name)
    return p


# ----------------------------------------------------------------------------------------
# Released sizes (for softdimo_jax.convert's registry; `bits` is unused by these families)


def maskgen_vq_defaults(bits=None) -> dict:
    """MaskGen-VQ-L (configs/infer/MaskGen/maskgen_vq_l.yaml), ~604M parameters."""
    return dict(codebook_size=8192, seq_len=128, embed_dim=1024, depth=16, num_heads=16,
                text_embed_dim=768, micro_condition=True, micro_condition_embed_dim=256,
                condition_num_classes=1000, weight_tying=True)


def tatitok_defaults(bits=None) -> dict:
    """TA-TiTok bl128 VQ (configs/infer/TA-TiTok/tatitok_bl128_vq.yaml), ~391M parameters."""
    return dict(image_size=256, enc_patch_size=16, dec_patch_size=16, enc_width=768, enc_layers=12,
                enc_heads=12, dec_width=1024, dec_layers=24, dec_heads=16, num_latent_tokens=128,
                token_size=64, codebook_size=8192, use_l2_norm=False, text_context_length=77,
                text_embed_dim=768)


def clip_text_defaults(bits=None) -> dict:
    """OpenCLIP ViT-L-14-336 (OpenAI weights) text tower, ~124M parameters."""
    return dict(vocab_size=49408, context_length=77, width=768, heads=12, layers=12, embed_dim=768,
                quick_gelu=True, pool_type="argmax", eos_id=49407, ln_eps=1e-5)
