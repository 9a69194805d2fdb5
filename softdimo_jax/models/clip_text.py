"""OpenCLIP's text tower (the CLIP text transformer) as a Flax linen module, as MaskGen uses it.

Parameter-compatible with open_clip's `CLIP` text keys (`token_embedding`,
`positional_embedding`, `transformer.resblocks.*`, `ln_final`, `text_projection`; see
`softdimo_jax.conversion.maskgen.convert_clip_text`). Pre-norm residual blocks with torch
MultiheadAttention (packed qkv, bias), causal mask, QuickGELU (x·sigmoid(1.702x)) for the
OpenAI-trained towers, LayerNorm eps 1e-5; pooling at the end token (`argmax` of the ids,
since the end token has the largest id) followed by `text_projection` (no bias).

Outputs (`ClipTextOutput`):
- `penultimate` (B, T, W): the output of the second-to-last block, no final LN — MaskGen's
  text condition;
- `text_guidance` (B, T, W): ln_final over the full-depth output — TA-TiTok's text input;
- `pooled` (B, 1, E): projected end-token feature — MaskGen's pooled condition.

`ResidualAttentionBlock` here is shared with the TA-TiTok ViTs (same structure, exact GELU,
no mask).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def _act(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return lambda x: nn.gelu(x, approximate=False)  # torch.nn.GELU(): exact erf
    raise ValueError(f"unknown activation {name!r}; expected 'gelu' or 'quick_gelu'")


def layer_norm(name: str, eps: float, dtype) -> nn.LayerNorm:
    # use_fast_variance=False: two-pass variance, as PyTorch.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class MultiheadSelfAttention(nn.Module):
    """torch.nn.MultiheadAttention self-attention: packed `in_proj` (q, k, v order), `out_proj`."""

    dim: int
    heads: int
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        """key_mask: optional (B, n) bool/int, false/0 at keys no query may attend to (HF
        CLIP's padding mask; only padded positions' outputs change, as position 0 always stays)."""
        if self.dim % self.heads:
            raise ValueError(f"width {self.dim} is not divisible by heads {self.heads}")
        b, n, _ = x.shape
        hd = self.dim // self.heads
        qkv = nn.Dense(3 * self.dim, dtype=self.dtype, name="in_proj")(x).reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        if self.causal:
            allowed = jnp.tril(jnp.ones((n, n), bool))
            logits = jnp.where(allowed, logits, -jnp.inf)
        if key_mask is not None:
            logits = jnp.where(jnp.asarray(key_mask, bool)[:, None, None, :], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.dim)
        return nn.Dense(self.dim, dtype=self.dtype, name="out_proj")(out)


class ResidualAttentionBlock(nn.Module):
    """open_clip / TiTok block: x + attn(ln_1(x)); x + c_proj(act(c_fc(ln_2(x))))."""

    dim: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = "gelu"
    causal: bool = False
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        h = layer_norm("ln_1", self.ln_eps, self.dtype)(x)
        x = x + MultiheadSelfAttention(self.dim, self.heads, self.causal, self.dtype, name="attn")(h, key_mask)
        h = layer_norm("ln_2", self.ln_eps, self.dtype)(x)
        h = nn.Dense(int(round(self.dim * self.mlp_ratio)), dtype=self.dtype, name="c_fc")(h)
        h = nn.Dense(self.dim, dtype=self.dtype, name="c_proj")(_act(self.act)(h))
        return x + h


class ClipTextOutput(NamedTuple):
    penultimate: Any  # (B, T, W)
    text_guidance: Any  # (B, T, W)
    pooled: Any  # (B, 1, E)


_POOL_TYPES = ("argmax", "eos", "first", "last")


class ClipTextTransformer(nn.Module):
    """OpenCLIP text tower. `model.apply(params, ids)` with ids (B, T) int -> ClipTextOutput."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    heads: int = 12
    layers: int = 12
    embed_dim: int = 768
    quick_gelu: bool = True
    pool_type: str = "argmax"
    eos_id: int = 49407
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32
    remat: bool = False
    # HF CLIPTextModel options: MLP width / model width (intermediate_size / hidden_size),
    # and ids shorter than the context (positions arange(T); OpenCLIP always pads to full length).
    mlp_ratio: float = 4.0
    variable_length: bool = False

    def setup(self):
        if self.pool_type not in _POOL_TYPES:
            raise ValueError(f"text pool type {self.pool_type!r} not in {_POOL_TYPES}")
        if self.layers < 1:
            raise ValueError("the text tower needs at least one layer")
        self.token_embedding = nn.Embed(self.vocab_size, self.width, name="token_embedding")
        self.positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width)
        )
        block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        act = "quick_gelu" if self.quick_gelu else "gelu"
        self.resblocks = [
            block(self.width, self.heads, self.mlp_ratio, act, True, self.ln_eps, self.dtype, name=f"resblocks_{i}")
            for i in range(self.layers)
        ]
        self.ln_final = layer_norm("ln_final", self.ln_eps, self.dtype)
        self.text_projection = self.param(
            "text_projection", nn.initializers.normal(self.width ** -0.5), (self.width, self.embed_dim)
        )

    def embed(self, ids):
        """Token + position embeddings (B, T, W) of ids (checked as in `__call__`)."""
        ids = jnp.asarray(ids, jnp.int32)
        t = ids.shape[-1] if ids.ndim == 2 else -1
        if ids.ndim != 2 or not (t == self.context_length or (self.variable_length and 0 < t <= self.context_length)):
            raise ValueError(
                f"ids must be (B, {self.context_length}) token ids, got shape {ids.shape}"
                " — tokenize with the model's context length"
            )
        return (self.token_embedding(ids) + self.positional_embedding[:t]).astype(self.dtype)

    def __call__(self, ids, attention_mask=None) -> ClipTextOutput:
        """ids (B, T) with T = context_length (T ≤ context_length when variable_length);
        attention_mask: optional (B, T), 1 up to and including the end token (HF's padding
        mask on top of the causal one; it changes only the padded positions' outputs)."""
        x = self.embed(ids)
        ids = jnp.asarray(ids, jnp.int32)
        t = ids.shape[-1]
        for blk in self.resblocks[:-1]:
            x = blk(x, attention_mask)
        penultimate = x
        x = self.ln_final(self.resblocks[-1](x, attention_mask))
        b = ids.shape[0]
        if self.pool_type == "argmax":
            pos = jnp.argmax(ids, axis=-1)
        elif self.pool_type == "eos":
            pos = jnp.argmax((ids == self.eos_id).astype(jnp.int32), axis=-1)
        elif self.pool_type == "first":
            pos = jnp.zeros((b,), jnp.int32)
        else:
            pos = jnp.full((b,), t - 1, jnp.int32)
        pooled = x[jnp.arange(b), pos]
        pooled = jnp.einsum("bw,we->be", pooled, self.text_projection.astype(self.dtype))
        return ClipTextOutput(
            penultimate.astype(jnp.float32), x.astype(jnp.float32), pooled[:, None, :].astype(jnp.float32)
        )


def drop_to_null(condition, condition_pooled, null_condition, null_pooled, drop_mask):
    """MaskGen's `preprocess_condition` mixing: rows where drop_mask (B,) or (B, 1, 1) is 1
    take the null (empty-caption) condition: c·(1 − m) + null·m."""
    m = jnp.asarray(drop_mask, jnp.float32).reshape(-1, 1, 1)
    cond = condition * (1.0 - m) + null_condition * m
    pooled = condition_pooled * (1.0 - m) + null_pooled * m
    return cond, pooled


def _get(cfg, key, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def clip_text_from_cfg(cfg: Mapping[str, Any], **overrides) -> ClipTextTransformer:
    """Builds the text tower from open_clip-style text config keys (width, heads, layers,
    vocab_size, context_length, embed_dim, quick_gelu, text_pool_type, eot_id,
    layer_norm_eps); defaults are ViT-L-14-336's."""
    kwargs = dict(
        vocab_size=int(_get(cfg, "vocab_size", 49408)),
        context_length=int(_get(cfg, "context_length", 77)),
        width=int(_get(cfg, "width", 768)),
        heads=int(_get(cfg, "heads", 12)),
        layers=int(_get(cfg, "layers", 12)),
        embed_dim=int(_get(cfg, "embed_dim", 768)),
        quick_gelu=bool(_get(cfg, "quick_gelu", True)),
        pool_type=str(_get(cfg, "text_pool_type", "argmax")),
        eos_id=int(_get(cfg, "eot_id", 49407)),
        ln_eps=float(_get(cfg, "layer_norm_eps", 1e-5)),
        mlp_ratio=float(_get(cfg, "mlp_ratio", 4.0)),
    )
    kwargs.update(overrides)
    return ClipTextTransformer(**kwargs)
