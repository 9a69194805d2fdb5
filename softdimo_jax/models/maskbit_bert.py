"""MaskBit's `LFQBert` (the class-conditional bit-token teacher) as a Flax linen module.

Parameter-compatible with the PyTorch original (see `softdimo_jax.conversion.maskbit`):
input_proj Linear(bits -> d) on ±1/0 bit vectors, class embedding with a drop label
(`num_classes`) appended as the LAST sequence position, learned position embedding,
LayerNorm(eps 1e-12) + dropout, `depth` BERT layers (post-norm by default), last layer
Linear + exact GELU + LayerNorm, prediction layer -> (B, L, S, V) logits.

The same module serves as teacher, generator and auxiliary: besides sub-token ids it
accepts continuous bit vectors (soft embeddings) or precomputed input embeddings, and it
can return every layer's hidden states (for discriminator heads).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.models import lfq
from softdimo_jax.models.lean_grads import attention_mix, dense, exact_gelu, gelu_dense, softmax_f32

_LN_EPS = 1e-12  # every LayerNorm of the original uses eps 1e-12


def _layer_norm(name: str, dtype) -> nn.LayerNorm:
    # use_fast_variance=False: the two-pass variance matches PyTorch to float32 round-off.
    return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


# Threefry-2x32 (20 rounds), unrolled. jax lowers its threefry primitive on CPU as a rolled
# 5-iteration while loop whose intermediates are materialised: ~12 ns per random word,
# which made dropout masks cost as much as the matmuls. Written as plain elementwise ops,
# XLA fuses it into the consumer at ~1.5 ns per word, with the same bits.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0, k1, x0, x1):
    rotl = lambda v, d: (v << np.uint32(d)) | (v >> np.uint32(32 - d))
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ rotl(x1, r)
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _threefry_key_data(rng):
    """(k0, k1) of a threefry key (raw uint32[2] or typed), or None for other PRNGs."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(rng)) != "threefry2x32" or rng.shape:
            return None
        rng = jax.random.key_data(rng)
    elif rng.shape != (2,) or rng.dtype != jnp.uint32 or jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    return rng[0], rng[1]


def bernoulli_threefry(rng, p: float, shape):
    """Bit-identical to `jax.random.bernoulli(rng, p, shape)` for threefry keys under
    jax_threefry_partitionable (the default): bits = w0 ^ w1 of threefry over the flat
    index, uniform = (bits >> 9)·2⁻²³, kept where uniform < float32(p). Falls back to
    jax.random.bernoulli for other PRNGs, big arrays or the legacy counter layout."""
    size = int(np.prod(shape))
    kd = _threefry_key_data(rng)
    if kd is None or size >= 2**32 or not jax.config.jax_threefry_partitionable:
        return jax.random.bernoulli(rng, p, shape)
    lo = jax.lax.iota(jnp.uint32, size).reshape(shape)  # flat index < 2**32: high word 0
    w0, w1 = _threefry2x32(kd[0], kd[1], jnp.zeros_like(lo), lo)
    threshold = int(np.ceil(np.float64(np.float32(p)) * 2**23))
    return ((w0 ^ w1) >> np.uint32(9)) < np.uint32(threshold)


class Dropout(nn.Module):
    """`flax.linen.Dropout` (same rng stream, same masks, same scaling) with the fused
    threefry mask above. Named `Dropout` so auto-named instances keep flax's rng paths."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if self.rate == 0.0 or deterministic:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        return jax.lax.select(self.keep_mask(x.shape), x / keep, jnp.zeros_like(x))

    def keep_mask(self, shape):
        """The boolean mask `__call__` would apply to an array of `shape` (rate < 1)."""
        return bernoulli_threefry(self.make_rng("dropout"), 1.0 - self.rate, shape)


class SelfAttention(nn.Module):
    """torch.nn.MultiheadAttention (bias, batch_first) without masking.

    `in_proj` packs q, k, v along its output axis in that order, as torch's
    `in_proj_weight` does; `out_proj` follows.
    """

    dim: int
    heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if self.dim % self.heads:
            raise ValueError(f"hidden_dim {self.dim} is not divisible by heads {self.heads}")
        b, n, _ = x.shape
        hd = self.dim // self.heads
        qkv = LeanDense(3 * self.dim, dtype=self.dtype, name="in_proj")(x)
        # Heads-major (3, B, h, L, hd) once: both attention products then run as plain
        # batched matmuls over (B, h); with (B, L, h, hd) operands XLA:CPU's batched dots ran
        # at half the speed (the probs @ v product most of all), in forward and backward.
        qkv = qkv.reshape(b, n, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # Scale q before the dot product, as torch does: (B, h, L, hd) elements instead of
        # (B, h, L, L), and XLA:CPU's fused attention kernel would otherwise take the scale
        # as a materialised (B, h, L, L) broadcast. Softmax runs in float32 for bf16 compute.
        logits = jnp.einsum("bhqd,bhkd->bhqk", q * (1.0 / math.sqrt(hd)), k)
        if deterministic or self.dropout == 0.0:
            out = jnp.einsum("bhqk,bhkd->bhqd", softmax_f32(logits, v.dtype), v)
        elif self.dropout == 1.0:
            out = jnp.zeros_like(v)
        else:
            # torch's MultiheadAttention applies its dropout to the attention weights.
            # attention_mix's backward keeps the weights and the boolean mask, not also
            # the dropped weights (one (B, h, L, L) float tensor less per layer).
            keep = Dropout(self.dropout).keep_mask(logits.shape)
            out = attention_mix(logits, v, keep, 1.0 - self.dropout)
        out = out.transpose(0, 2, 1, 3).reshape(b, n, self.dim)
        return LeanDense(self.dim, dtype=self.dtype, name="out_proj")(out)


class LeanDense(nn.Dense):
    """`nn.Dense` with a bias (same parameters, initialisers and forward values) whose
    backward keeps fewer activations alive; with `gelu_input` it applies to gelu(inputs)
    and keeps only `inputs` (see `lean_grads`)."""

    gelu_input: bool = False

    @nn.compact
    def __call__(self, inputs):
        if not self.use_bias:
            raise ValueError("LeanDense needs use_bias=True")
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        return (gelu_dense if self.gelu_input else dense)(inputs, kernel, bias)


class BertLayer(nn.Module):
    """One transformer layer: attention block then MLP block, each with its own norm.

    Post-norm (default): x = LN(x + drop(attn(x))); x = LN(x + drop(mlp(x))).
    Pre-norm: x = x + drop(attn(LN(x))); x = x + drop(mlp(LN(x))).
    """

    dim: int
    heads: int
    mlp_dim: int
    dropout: float = 0.0
    use_prenorm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        drop = lambda y: Dropout(self.dropout)(y, deterministic=deterministic)
        attn = SelfAttention(self.dim, self.heads, self.dropout, self.dtype, name="attn")
        attn_norm = _layer_norm("attn_norm", self.dtype)
        fc1 = LeanDense(self.mlp_dim, dtype=self.dtype, name="mlp_fc1")
        fc2 = LeanDense(self.dim, dtype=self.dtype, gelu_input=True, name="mlp_fc2")  # fc2(gelu(.))
        mlp_norm = _layer_norm("mlp_norm", self.dtype)
        mlp = lambda y: drop(fc2(fc1(y)))
        if self.use_prenorm:
            x = x + drop(attn(attn_norm(x), deterministic))
            return x + mlp(mlp_norm(x))
        x = attn_norm(x + drop(attn(x, deterministic)))
        return mlp_norm(x + mlp(x))


class LFQBert(nn.Module):
    """MaskBit's bit-token BERT. See the module docstring; build from a MaskBit constructor
    dict with `maskbit_bert_from_cfg`.

    Call with exactly one of
      tokens (B, L, S) int sub-token ids (MASK = 2**(bits/S)),
      input_bits (B, L, bits) float bit vectors, split-major (MASK = zeros; soft bits OK),
      input_embeddings (B, L, hidden) = embed_bits(bits), before class token / positions;
    labels (B,) int in [0, num_classes]; drop_label_mask (B,) bool replaces the label by
    the drop label `num_classes` (None drops nothing; note the PyTorch original drops
    EVERY label when it gets no mask). Returns logits (B, L, S, V) float32, V = 2**(bits/S);
    with return_features also a tuple of each layer's output (B, L+1, hidden), the class
    token last. Dropout needs deterministic=False and a 'dropout' rng.
    """

    num_tokens: int
    num_bits: int
    splits: int = 2
    hidden_dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    num_classes: int = 1000
    dropout: float = 0.1
    use_prenorm: bool = False
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def bits_per_split(self) -> int:
        return lfq.bits_per_split(self.num_bits, self.splits)

    @property
    def vocab_size(self) -> int:
        """V: classes per sub-token (MASK excluded)."""
        return 2**self.bits_per_split

    @property
    def mask_token(self) -> int:
        return lfq.mask_id(self.num_bits, self.splits)

    @property
    def drop_label(self) -> int:
        return self.num_classes

    def setup(self):
        lfq.bits_per_split(self.num_bits, self.splits)  # validates the split
        d = self.hidden_dim
        self.input_proj = nn.Dense(d, dtype=self.dtype, name="input_proj")
        self.class_emb = nn.Embed(self.num_classes + 1, d, dtype=self.dtype, name="class_emb")
        self.pos_emb = self.param(
            "pos_emb", nn.initializers.truncated_normal(0.02), (1, self.num_tokens + 1, d)
        )
        self.first_norm = _layer_norm("first_norm", self.dtype)
        self.first_dropout = Dropout(self.dropout)
        if self.use_prenorm:
            self.final_norm = _layer_norm("final_norm", self.dtype)
        self.last_dense = nn.Dense(d, dtype=self.dtype, name="last_dense")
        self.last_norm = _layer_norm("last_norm", self.dtype)
        self.prediction = nn.Dense(self.splits * self.vocab_size, dtype=self.dtype, name="prediction")
        # static_argnums=(2,): `deterministic` (argument 2 counting the module) is a Python bool.
        layer_cls = nn.remat(BertLayer, static_argnums=(2,)) if self.remat else BertLayer
        self.layers = [
            layer_cls(self.hidden_dim, self.heads, self.mlp_dim, self.dropout, self.use_prenorm,
                      self.dtype, name=f"layer_{i}")
            for i in range(self.depth)
        ]

    def embed_bits(self, input_bits):
        """(B, L, bits) split-major bit vectors (±1, 0 for MASK, or soft) -> (B, L, hidden)."""
        if input_bits.shape[-1] != self.num_bits:
            raise ValueError(
                f"input_bits has {input_bits.shape[-1]} bits per token, the model expects {self.num_bits}"
            )
        return self.input_proj(input_bits)

    def tokens_to_bits(self, tokens):
        """(B, L, S) sub-token ids (MASK = 2**(bits/S)) -> (B, L, bits) ±1 / 0 bit vectors."""
        return lfq.subtokens_to_bits(tokens, self.num_bits, self.splits, jnp.float32)

    def __call__(
        self,
        tokens=None,
        labels=None,
        *,
        drop_label_mask=None,
        input_bits=None,
        input_embeddings=None,
        deterministic: bool = True,
        return_features: bool = False,
    ):
        given = [n for n, v in (("tokens", tokens), ("input_bits", input_bits),
                                ("input_embeddings", input_embeddings)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "LFQBert takes exactly one of tokens, input_bits, input_embeddings; got "
                + (", ".join(given) if given else "none")
            )
        if labels is None:
            raise ValueError("LFQBert needs class labels (B,); use drop_label_mask for unconditional")

        if tokens is not None:
            if tokens.ndim != 3 or tokens.shape[-1] != self.splits:
                raise ValueError(
                    f"tokens must be (B, L, S={self.splits}) sub-token ids, got shape {tokens.shape}"
                )
            input_bits = self.tokens_to_bits(tokens)
        if input_bits is not None:
            input_embeddings = self.embed_bits(input_bits.astype(self.dtype))
        b, n, d = input_embeddings.shape
        if n != self.num_tokens or d != self.hidden_dim:
            raise ValueError(
                f"expected {self.num_tokens} tokens of width {self.hidden_dim}, got input of shape "
                f"{input_embeddings.shape}"
            )

        _check_range("labels", labels, self.num_classes, "num_classes (the drop label)")
        if tokens is not None:
            _check_range("tokens", tokens, self.mask_token, "the MASK id 2**(bits/S)")
        labels = jnp.asarray(labels, jnp.int32).reshape(b)
        if drop_label_mask is not None:
            labels = jnp.where(jnp.asarray(drop_label_mask, bool).reshape(b), self.drop_label, labels)
        # One-hot matmul instead of a gather: it works unchanged when the batch is sharded
        # over an Explicit-axes mesh (jax.make_mesh's default), where a gather from a
        # replicated table has no unambiguous output sharding. HIGHEST keeps the table
        # exact on TPUs (default precision would round it to bf16).
        onehot = jax.nn.one_hot(labels, self.num_classes + 1, dtype=jnp.float32)
        cls = jnp.einsum("bn,nd->bd", onehot, self.class_emb.embedding.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)[:, None, :]

        # The class token goes LAST, after the L image tokens.
        x = jnp.concatenate([input_embeddings.astype(self.dtype), cls.astype(self.dtype)], axis=1)
        x = x + self.pos_emb.astype(self.dtype)
        x = self.first_norm(x)
        x = self.first_dropout(x, deterministic=deterministic)

        features = []
        for layer in self.layers:
            x = layer(x, deterministic)
            features.append(x)
        if self.use_prenorm:
            x = self.final_norm(x)
        x = self.last_norm(exact_gelu(self.last_dense(x)))
        logits = self.prediction(x[:, : self.num_tokens])
        logits = logits.reshape(b, self.num_tokens, self.splits, self.vocab_size).astype(jnp.float32)
        if return_features:
            return logits, tuple(features)
        return logits


def _check_range(name: str, x, high: int, what: str) -> None:
    """Raises for out-of-range ids when they are concrete (a one-hot of an out-of-range
    label would silently be zero); traced values are left to the caller."""
    if isinstance(x, jax.core.Tracer):
        return
    arr = np.asarray(x)
    if arr.size and (arr.min() < 0 or arr.max() > high):
        raise ValueError(f"{name} must lie in [0, {high}] ({what}), got [{arr.min()}, {arr.max()}]")


def _cfg_get(cfg: Mapping[str, Any], key: str, default=None):
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def maskbit_bert_from_cfg(cfg: Mapping[str, Any], **overrides) -> LFQBert:
    """Builds an LFQBert from MaskBit's constructor arguments (as in the parity fixtures:
    img_size, hidden_dim, codebook_size, codebook_splits, depth, heads, mlp_dim, dropout,
    nclass, input_stride, use_prenorm). Keyword overrides (dtype, remat, dropout) win."""
    img_size = int(_cfg_get(cfg, "img_size", 256))
    stride = int(_cfg_get(cfg, "input_stride", 16))
    codebook_size = int(_cfg_get(cfg, "codebook_size"))
    bits = int(round(math.log2(codebook_size)))
    if 2**bits != codebook_size:
        raise ValueError(f"codebook_size {codebook_size} is not a power of two")
    kwargs = dict(
        num_tokens=(img_size // stride) ** 2,
        num_bits=bits,
        splits=int(_cfg_get(cfg, "codebook_splits", 1)),
        hidden_dim=int(_cfg_get(cfg, "hidden_dim", 768)),
        depth=int(_cfg_get(cfg, "depth", 24)),
        heads=int(_cfg_get(cfg, "heads", 8)),
        mlp_dim=int(_cfg_get(cfg, "mlp_dim", 3072)),
        num_classes=int(_cfg_get(cfg, "nclass", 1000)),
        dropout=float(_cfg_get(cfg, "dropout", 0.1)),
        use_prenorm=bool(_cfg_get(cfg, "use_prenorm", False)),
    )
    kwargs.update(overrides)
    return LFQBert(**kwargs)


def maskbit_bert_from_config(config, **overrides) -> LFQBert:
    """Builds an LFQBert from a `configs/maskbit.py` generator ConfigDict (our field names:
    num_tokens, num_bits, splits, hidden_dim, depth, heads, mlp_dim, num_classes, dropout,
    use_prenorm, dtype, remat)."""
    fields = ("num_tokens", "num_bits", "splits", "hidden_dim", "depth", "heads", "mlp_dim",
              "num_classes", "dropout", "use_prenorm", "remat")
    kwargs = {f: _cfg_get(config, f) for f in fields if _cfg_get(config, f) is not None}
    dtype = _cfg_get(config, "dtype")
    if dtype is not None:
        kwargs["dtype"] = jnp.dtype(dtype)
    kwargs.update(overrides)
    return LFQBert(**kwargs)
