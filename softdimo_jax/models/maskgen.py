"""MaskGen's `MaskGen_VQ` text-to-image transformer (SD3-style MM-DiT) as a Flax linen module.

Parameter-compatible with the PyTorch original (see `softdimo_jax.conversion.maskgen`).
Structure: image tokens (B, L) -> embedding table (K codes, MASK = K, class rows and the
null-condition row kept for compatibility) + learned positions; text tokens (B, 77, TW) ->
`text_embed_proj`; pooled text (B, 1, TW) ++ aesthetic sinusoid -> `cond_pooled_proj` = the
modulation vector `temb`; `depth` joint blocks over [image; text]; AdaLayerNormContinuous;
weight-tied head (logits = x @ E[:K]^T, no bias).

Quirks kept from the original (diffusers' JointTransformerBlock / AdaLayerNormZero /
AdaLayerNormContinuous):
- every LayerNorm inside the blocks and the final norm: eps 1e-6, no affine;
- AdaLayerNormZero chunks the modulation as shift, scale, gate (attention) then shift,
  scale, gate (MLP), applied as LN(x)·(1 + scale) + shift;
- the last block's text stream ("context_pre_only") and the final norm use
  AdaLayerNormContinuous, whose chunk order is scale first, then shift; that block has no
  text output projection and no text MLP (its text output is discarded);
- joint attention: one softmax over the concatenated image and text keys, scale
  1/sqrt(head_dim), no mask; MLPs use the tanh-approximate GELU;
- aesthetic micro-condition: score·100 into a sinusoid with max period 1000, [sin, cos].

Extras over the original: `input_embeddings=` feeds precomputed (soft) embeddings instead
of token ids, `return_features=True` also returns every block's image-stream output.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_LN_EPS = 1e-6


def _plain_layer_norm(x, eps: float = _LN_EPS):
    """LayerNorm without affine parameters; statistics in float32 (two-pass variance)."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + eps)).astype(dtype)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def aesthetic_embedding(score, dim: int, max_period: float = 1000.0):
    """MaskGen's micro-condition: sinusoid of score·100, [sin, cos] halves, zero pad if odd.

    The frequencies exp(-ln(max_period)·i / half) are constants: computed on the host in
    float64 and rounded once, which matches the reference closest (the phase reaches ~700
    rad, so one ulp of a frequency shows in the output).
    """
    half = dim // 2
    freqs = jnp.asarray(np.exp(-math.log(max_period) * np.arange(half) / half).astype(np.float32))
    t = jnp.asarray(score, jnp.float32).reshape(-1) * 100.0
    args = t[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def guided_logits(cond_logits, uncond_logits, scale):
    """MaskGen's guidance: cond + (cond − uncond)·scale (note: not uncond + s·(cond − uncond))."""
    return cond_logits + (cond_logits - uncond_logits) * scale


class FeedForward(nn.Module):
    """diffusers FeedForward(dim, activation "gelu-approximate"): Linear(d, 4d), tanh GELU, Linear(4d, d)."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4 * self.dim, dtype=self.dtype, name="proj_in")(x)
        h = nn.gelu(h, approximate=True)
        return nn.Dense(self.dim, dtype=self.dtype, name="proj_out")(h)


class JointAttention(nn.Module):
    """Joint attention of the image stream (to_q/k/v, to_out) and the text stream
    (add_q/k/v_proj, to_add_out) over the concatenated sequence."""

    dim: int
    heads: int
    context_pre_only: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        b, n_x, _ = x.shape
        n_c = c.shape[1]
        hd = self.dim // self.heads
        dense = lambda name: nn.Dense(self.dim, dtype=self.dtype, name=name)
        heads = lambda t: t.reshape(b, t.shape[1], self.heads, hd)
        q = jnp.concatenate([heads(dense("to_q")(x)), heads(dense("add_q_proj")(c))], axis=1)
        k = jnp.concatenate([heads(dense("to_k")(x)), heads(dense("add_k_proj")(c))], axis=1)
        v = jnp.concatenate([heads(dense("to_v")(x)), heads(dense("add_v_proj")(c))], axis=1)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n_x + n_c, self.dim)
        out_x = dense("to_out")(out[:, :n_x])
        if self.context_pre_only:
            return out_x, None
        return out_x, dense("to_add_out")(out[:, n_x:])


class JointBlock(nn.Module):
    """diffusers JointTransformerBlock (no qk-norm, no dual attention)."""

    dim: int
    heads: int
    context_pre_only: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c, temb):
        d = self.dim
        silu_t = nn.silu(temb)
        mod = nn.Dense(6 * d, dtype=self.dtype, name="norm1")(silu_t)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        nx = _modulate(_plain_layer_norm(x), shift_msa, scale_msa)
        if self.context_pre_only:
            # AdaLayerNormContinuous: scale first, then shift.
            cmod = nn.Dense(2 * d, dtype=self.dtype, name="norm1_context")(silu_t)
            c_scale, c_shift = jnp.split(cmod, 2, axis=-1)
            nc = _modulate(_plain_layer_norm(c), c_shift, c_scale)
        else:
            cmod = nn.Dense(6 * d, dtype=self.dtype, name="norm1_context")(silu_t)
            (c_shift_msa, c_scale_msa, c_gate_msa,
             c_shift_mlp, c_scale_mlp, c_gate_mlp) = jnp.split(cmod, 6, axis=-1)
            nc = _modulate(_plain_layer_norm(c), c_shift_msa, c_scale_msa)

        a_x, a_c = JointAttention(d, self.heads, self.context_pre_only, self.dtype, name="attn")(nx, nc)
        x = x + gate_msa[:, None, :] * a_x
        h = _modulate(_plain_layer_norm(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None, :] * FeedForward(d, self.dtype, name="ff")(h)
        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa[:, None, :] * a_c
        h = _modulate(_plain_layer_norm(c), c_shift_mlp, c_scale_mlp)
        c = c + c_gate_mlp[:, None, :] * FeedForward(d, self.dtype, name="ff_context")(h)
        return x, c


class MaskGenVQ(nn.Module):
    """MaskGen-VQ. Build from the original's config tree with `maskgen_vq_from_cfg`.

    Call: `model.apply(params, tokens, condition, condition_pooled, aesthetic_score)`
    with tokens (B, L) int (MASK = codebook_size), condition (B, T, text_dim) (OpenCLIP
    penultimate tokens), condition_pooled (B, 1, text_dim) or (B, text_dim), aesthetic_score
    (B,) or a scalar (needed when micro_condition). Returns logits (B, L, K) float32.
    """

    codebook_size: int = 8192
    seq_len: int = 128
    embed_dim: int = 1024
    depth: int = 16
    num_heads: int = 16
    text_embed_dim: int = 768
    micro_condition: bool = True
    micro_condition_embed_dim: int = 256
    condition_num_classes: int = 1000
    weight_tying: bool = True
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size

    @property
    def num_embeddings(self) -> int:
        # K codes, MASK, the (unused) class rows, the null-condition row.
        return self.codebook_size + 1 + self.condition_num_classes + 1

    @property
    def none_condition_id(self) -> int:
        return self.codebook_size + 1 + self.condition_num_classes

    def setup(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        d = self.embed_dim
        init = nn.initializers.truncated_normal(0.02)
        self.embeddings = nn.Embed(self.num_embeddings, d, embedding_init=init, name="embeddings")
        self.pos_embed = self.param("pos_embed", init, (1, self.seq_len, d))
        self.text_embed_proj = nn.Dense(d, dtype=self.dtype, name="text_embed_proj")
        self.cond_pooled_proj = nn.Dense(d, dtype=self.dtype, name="cond_pooled_proj")
        block_cls = nn.remat(JointBlock) if self.remat else JointBlock
        self.blocks = [
            block_cls(d, self.num_heads, i == self.depth - 1, self.dtype, name=f"blocks_{i}")
            for i in range(self.depth)
        ]
        self.norm = nn.Dense(2 * d, dtype=self.dtype, name="norm")
        if not self.weight_tying:
            self.lm_head = nn.Dense(self.codebook_size, dtype=self.dtype, name="lm_head")

    # --- embeddings -------------------------------------------------------------------
    def embedding_table(self):
        """The K code rows of the input embedding (= the tied output head), (K, d)."""
        return self.embeddings.embedding[: self.codebook_size]

    def embed_tokens(self, tokens):
        """(B, L) ids (MASK = K) -> (B, L, d) input embeddings (before positions)."""
        return self.embeddings(jnp.asarray(tokens, jnp.int32))

    def embed_probs(self, probs):
        """Soft embeddings p @ E: probs (B, L, K) over codes, or (B, L, K+1) with a MASK column."""
        n = probs.shape[-1]
        if n not in (self.codebook_size, self.codebook_size + 1):
            raise ValueError(
                f"probs have {n} classes; expected {self.codebook_size} (codes) or "
                f"{self.codebook_size + 1} (codes + MASK)"
            )
        table = self.embeddings.embedding[:n]
        return jnp.einsum("...k,kd->...d", probs.astype(jnp.float32), table.astype(jnp.float32))

    # --- conditions ---------------------------------------------------------------------
    def pooled_with_micro(self, condition_pooled, aesthetic_score):
        """(B, 1, TW) pooled text -> (B, 1, TW + M) with the aesthetic sinusoid appended."""
        pooled = condition_pooled.reshape(condition_pooled.shape[0], -1)
        if not self.micro_condition:
            return pooled[:, None, :]
        if aesthetic_score is None:
            raise ValueError("this MaskGen uses the aesthetic micro-condition: pass aesthetic_score (e.g. 6.5)")
        score = jnp.broadcast_to(jnp.asarray(aesthetic_score, jnp.float32).reshape(-1), (pooled.shape[0],))
        emb = aesthetic_embedding(score, self.micro_condition_embed_dim)
        return jnp.concatenate([pooled.astype(jnp.float32), emb], axis=-1)[:, None, :]

    def __call__(
        self,
        tokens=None,
        condition=None,
        condition_pooled=None,
        aesthetic_score=None,
        *,
        input_embeddings=None,
        return_features: bool = False,
    ):
        if (tokens is None) == (input_embeddings is None):
            raise ValueError("MaskGenVQ takes exactly one of tokens (B, L) or input_embeddings (B, L, d)")
        if condition is None or condition_pooled is None:
            raise ValueError("MaskGenVQ needs condition (B, T, text_dim) and condition_pooled (B, 1, text_dim)")
        if tokens is not None:
            if tokens.ndim != 2:
                raise ValueError(f"tokens must be (B, L) ids, got shape {tokens.shape}")
            x = self.embed_tokens(tokens)
        else:
            if input_embeddings.ndim != 3 or input_embeddings.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"input_embeddings must be (B, L, {self.embed_dim}), got {input_embeddings.shape}"
                )
            x = input_embeddings
        b, n = x.shape[:2]
        if n > self.seq_len:
            raise ValueError(f"{n} image tokens, the model has positions for {self.seq_len}")
        if condition.shape[-1] != self.text_embed_dim:
            raise ValueError(f"condition width {condition.shape[-1]} != text_embed_dim {self.text_embed_dim}")

        x = (x + self.pos_embed[:, :n]).astype(self.dtype)
        c = self.text_embed_proj(condition.astype(self.dtype))
        pooled = self.pooled_with_micro(condition_pooled, aesthetic_score)
        temb = self.cond_pooled_proj(pooled.astype(self.dtype))[:, 0]

        features = []
        for blk in self.blocks:
            x, c = blk(x, c, temb)
            features.append(x)
        scale, shift = jnp.split(self.norm(nn.silu(temb)), 2, axis=-1)
        x = _modulate(_plain_layer_norm(x), shift, scale)
        if self.weight_tying:
            table = self.embedding_table().astype(self.dtype)
            logits = jnp.einsum("bld,kd->blk", x, table, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if return_features:
            return logits, tuple(features)
        return logits


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def maskgen_vq_from_cfg(cfg: Mapping[str, Any], **overrides) -> MaskGenVQ:
    """Builds MaskGenVQ from the original's config tree (`model.vq_model`, `model.maskgen`),
    e.g. configs/infer/MaskGen/maskgen_vq_l.yaml or a parity fixture's cfg. Keyword
    overrides (dtype, remat) win."""
    model = _get(cfg, "model", cfg)
    vq = _get(model, "vq_model")
    mg = _get(model, "maskgen")
    if vq is None or mg is None:
        raise ValueError("MaskGen config needs model.vq_model and model.maskgen sections")
    kwargs = dict(
        codebook_size=int(_get(vq, "codebook_size")),
        seq_len=int(_get(vq, "num_latent_tokens")),
        text_embed_dim=int(_get(vq, "text_embed_dim", 768)),
        embed_dim=int(_get(mg, "decoder_embed_dim")),
        depth=int(_get(mg, "decoder_depth")),
        num_heads=int(_get(mg, "decoder_num_heads")),
        micro_condition=bool(_get(mg, "micro_condition")),
        micro_condition_embed_dim=int(_get(mg, "micro_condition_embed_dim", 0) or 0),
        condition_num_classes=int(_get(mg, "condition_num_classes")),
        weight_tying=bool(_get(mg, "weight_tying", True)),
    )
    kwargs.update(overrides)
    return MaskGenVQ(**kwargs)


def embedding_table(params, codebook_size: int):
    """The tied head / input embedding rows of the K codes from a params tree, (K, d)."""
    return params["embeddings"]["embedding"][:codebook_size]


def maskgen_vq_from_config(config, **overrides) -> MaskGenVQ:
    """Builds MaskGenVQ from our own field names (a ConfigDict or dict with codebook_size,
    seq_len, embed_dim, depth, num_heads, text_embed_dim, micro_condition,
    micro_condition_embed_dim, condition_num_classes, weight_tying, dtype, remat)."""
    fields = ("codebook_size", "seq_len", "embed_dim", "depth", "num_heads", "text_embed_dim",
              "micro_condition", "micro_condition_embed_dim", "condition_num_classes", "weight_tying",
              "remat")
    kwargs = {f: _get(config, f) for f in fields if _get(config, f) is not None}
    if _get(config, "dtype") is not None:
        kwargs["dtype"] = jnp.dtype(_get(config, "dtype"))
    kwargs.update(overrides)
    return MaskGenVQ(**kwargs)
