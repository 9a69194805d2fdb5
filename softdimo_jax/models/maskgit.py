"""Di[M]O's MaskGIT teacher (`MaskTransformer`, MaskGIT-pytorch) as a Flax linen module.

Parameter-compatible with the PyTorch original (see `softdimo_jax.conversion.maskgit`):

- one embedding table `tok_emb` (V_all = codebook_size + 1 + nclass + 1 rows) for visual
  tokens [0, K), MASK (= K), classes (K + 1 + c) and the null class (last row);
- the class token goes LAST, after the L = (img_size // 16)**2 visual tokens, and a
  learned position embedding covers all L + 1 positions;
- `first_layer`: LN(eps 1e-12), dropout, Linear, exact GELU, LN(eps 1e-12), dropout, Linear;
- `depth` pre-norm layers (LayerNorm eps 1e-5, torch MultiheadAttention with bias, MLP with
  exact GELU);
- `last_layer`: LN(eps 1e-12), dropout, Linear, exact GELU, LN(eps 1e-12);
- tied head: logits = x @ tok_embᵀ + bias (bias is per position and per row), keeping the
  L visual positions and the K + 1 rows of visual tokens and MASK.

Di[M]O's generator path perturbs the visual token embeddings before the position embedding
(`noise_emb_perturb`): pass `input_embeddings = perturb_embeddings(embed_tokens(t), σ, key)`.
Soft embeddings (p @ E) come from `soft_embed(probs)`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from softdimo_jax.models.lean_grads import exact_gelu

_LN_EPS_OUTER = 1e-12  # first_layer / last_layer LayerNorms (BERT eps)
_LN_EPS_BLOCK = 1e-5  # PreNorm's nn.LayerNorm(dim) keeps torch's default eps

# Di[M]O's ImageNet-256 teacher (MaskGIT-pytorch "small"): 16 heads, not the constructor's 8.
IMAGENET256_CFG = dict(
    img_size=256, hidden_dim=768, codebook_size=1024, depth=24, heads=16, mlp_dim=3072,
    dropout=0.1, nclass=1000,
)
# MaskTransformer.__init__ defaults, used for keys a config leaves out.
_TORCH_DEFAULTS = dict(
    img_size=256, hidden_dim=768, codebook_size=1024, depth=24, heads=8, mlp_dim=3072,
    dropout=0.1, nclass=1000,
)


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Two-pass variance and float32 statistics: matches PyTorch to float32 round-off, also
    # when the surrounding compute runs in bf16.
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


def perturb_embeddings(embeddings, sigma: float, key):
    """Di[M]O's `noise_emb_perturb`: e <- σ·ε + sqrt(1 − σ²)·e with ε ~ N(0, I).

    Applied to the (B, L, d) visual token embeddings only (not the class token), before
    the position embedding. σ = 0 returns `embeddings` unchanged.
    """
    sigma = float(sigma)
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must be in [0, 1] (it mixes noise and embedding), got {sigma}")
    if sigma == 0.0:
        return embeddings
    eps = jax.random.normal(key, embeddings.shape, jnp.float32)
    out = sigma * eps + math.sqrt(1.0 - sigma**2) * embeddings.astype(jnp.float32)
    return out.astype(embeddings.dtype)


class SelfAttention(nn.Module):
    """torch.nn.MultiheadAttention(dim, heads, bias=True, batch_first=True), no mask.

    `in_proj` keeps torch's packed q, k, v order along its output axis.
    """

    dim: int
    heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        b, n, _ = x.shape
        hd = self.dim // self.heads
        qkv = nn.Dense(3 * self.dim, dtype=self.dtype, name="in_proj")(x)
        qkv = qkv.reshape(b, n, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        # torch's MultiheadAttention applies its dropout to the attention weights.
        probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.dim)
        return nn.Dense(self.dim, dtype=self.dtype, name="out_proj")(out)


class PreNormLayer(nn.Module):
    """x += attn(LN(x)); x += mlp(LN(x)) with mlp = Linear, GELU, dropout, Linear, dropout."""

    dim: int
    heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = _layer_norm(_LN_EPS_BLOCK, "attn_norm")(x).astype(self.dtype)
        x = x + SelfAttention(self.dim, self.heads, self.dropout, self.dtype, name="attn")(h, deterministic)
        h = _layer_norm(_LN_EPS_BLOCK, "mlp_norm")(x).astype(self.dtype)
        h = exact_gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_fc1")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = nn.Dense(self.dim, dtype=self.dtype, name="mlp_fc2")(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return x + h


class MaskGITTransformer(nn.Module):
    """Di[M]O's MaskGIT `MaskTransformer`. Field names follow the original's constructor;
    defaults are Di[M]O's ImageNet-256 teacher. Build from an original config with
    `maskgit_transformer_from_cfg`."""

    img_size: int = 256
    hidden_dim: int = 768
    codebook_size: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 3072
    dropout: float = 0.1
    nclass: int = 1000
    dtype: Any = jnp.float32  # compute dtype (bf16 option); params, norms, softmax, logits stay f32
    remat: bool = False

    # --- token layout -------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.img_size // 16

    @property
    def num_tokens(self) -> int:
        """L: visual tokens per image."""
        return self.grid_size**2

    @property
    def mask_token(self) -> int:
        return self.codebook_size

    @property
    def num_logits(self) -> int:
        """Classes the head keeps: K visual tokens + MASK."""
        return self.codebook_size + 1

    @property
    def null_class_token(self) -> int:
        """Row of the dropped (unconditional) class."""
        return self.codebook_size + 1 + self.nclass

    @property
    def vocab_size(self) -> int:
        """Rows of the tied embedding table."""
        return self.codebook_size + self.nclass + 2

    def setup(self):
        if self.img_size % 16 or self.img_size < 16:
            raise ValueError(f"img_size must be a positive multiple of 16 (tokens = img_size // 16), got {self.img_size}")
        if self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by heads {self.heads}")
        d, n = self.hidden_dim, self.num_tokens
        self.tok_emb = nn.Embed(self.vocab_size, d, embedding_init=nn.initializers.normal(1.0), name="tok_emb")
        self.pos_emb = self.param("pos_emb", nn.initializers.truncated_normal(0.02), (1, n + 1, d))
        self.first_norm_0 = _layer_norm(_LN_EPS_OUTER, "first_norm_0")
        self.first_dense_0 = nn.Dense(d, dtype=self.dtype, name="first_dense_0")
        self.first_norm_1 = _layer_norm(_LN_EPS_OUTER, "first_norm_1")
        self.first_dense_1 = nn.Dense(d, dtype=self.dtype, name="first_dense_1")
        # static_argnums=(2,): `deterministic` (argument 2 counting the module) is a Python bool.
        layer_cls = nn.remat(PreNormLayer, static_argnums=(2,)) if self.remat else PreNormLayer
        self.layers = [
            layer_cls(d, self.heads, self.mlp_dim, self.dropout, self.dtype, name=f"layer_{i}")
            for i in range(self.depth)
        ]
        self.last_norm_0 = _layer_norm(_LN_EPS_OUTER, "last_norm_0")
        self.last_dense = nn.Dense(d, dtype=self.dtype, name="last_dense")
        self.last_norm_1 = _layer_norm(_LN_EPS_OUTER, "last_norm_1")
        self.bias = self.param("bias", nn.initializers.zeros, (n + 1, self.vocab_size))
        self.drop = nn.Dropout(self.dropout)

    # --- embeddings ---------------------------------------------------------------------
    def embedding_table(self):
        """The tied (vocab_size, d) table: rows [0, K) visual tokens, K MASK, then classes."""
        return self.tok_emb.embedding

    def embed_tokens(self, tokens):
        """(B, h, w) or (B, L) token ids (MASK = codebook_size) -> (B, L, d) embeddings."""
        tokens = jnp.asarray(tokens)
        b = tokens.shape[0]
        tokens = tokens.reshape(b, -1)
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(
                f"expected {self.num_tokens} tokens per image ({self.grid_size}x{self.grid_size}), "
                f"got tokens of shape {tokens.shape}"
            )
        return jnp.take(self.embedding_table(), tokens.astype(jnp.int32), axis=0)

    def soft_embed(self, probs):
        """Expected embedding p @ E of (B, L, K) or (B, L, K + 1) probabilities over visual
        tokens (optionally MASK as the last entry)."""
        k = probs.shape[-1]
        if k not in (self.codebook_size, self.codebook_size + 1):
            raise ValueError(
                f"probs must have {self.codebook_size} (visual tokens) or {self.codebook_size + 1} "
                f"(with MASK) entries on the last axis, got {k}"
            )
        table = self.embedding_table()[:k]
        return jnp.einsum("blk,kd->bld", probs.astype(jnp.float32), table)

    # --- forward ------------------------------------------------------------------------
    def __call__(
        self,
        tokens=None,
        labels=None,
        *,
        drop_label=None,
        input_embeddings=None,
        deterministic: bool = True,
        return_features: bool = False,
    ):
        """Logits (B, L, codebook_size + 1) in float32.

        Args:
          tokens: (B, h, w) or (B, L) ids, MASK = codebook_size. Exclusive with
            `input_embeddings`.
          labels: (B,) class ids in [0, nclass).
          drop_label: optional (B,) bool; True replaces the class by the null class (CFG).
          input_embeddings: (B, L, d) visual token embeddings replacing tok_emb[tokens]
            (perturbed or soft embeddings); the class token is still looked up.
          deterministic: False enables dropout (needs a 'dropout' rng).
          return_features: also return the hidden states after every transformer layer,
            a tuple of `depth` arrays (B, L + 1, d).
        """
        if (tokens is None) == (input_embeddings is None):
            raise ValueError("MaskGITTransformer takes exactly one of tokens, input_embeddings")
        if labels is None:
            raise ValueError("MaskGITTransformer needs class labels (B,); use drop_label for unconditional")
        if tokens is not None:
            input_embeddings = self.embed_tokens(tokens)
        b, n, d = input_embeddings.shape
        if n != self.num_tokens or d != self.hidden_dim:
            raise ValueError(
                f"expected input embeddings of shape (B, {self.num_tokens}, {self.hidden_dim}), "
                f"got {input_embeddings.shape}"
            )
        labels = jnp.asarray(labels, jnp.int32).reshape(b)
        cls_ids = labels + self.codebook_size + 1
        if drop_label is not None:
            cls_ids = jnp.where(jnp.asarray(drop_label, bool).reshape(b), self.null_class_token, cls_ids)
        cls = jnp.take(self.embedding_table(), cls_ids, axis=0)[:, None, :]

        # The class token goes LAST, after the L visual tokens.
        x = jnp.concatenate([input_embeddings.astype(jnp.float32), cls.astype(jnp.float32)], axis=1)
        x = x + self.pos_emb

        x = self.drop(self.first_norm_0(x), deterministic=deterministic).astype(self.dtype)
        x = exact_gelu(self.first_dense_0(x))
        x = self.drop(self.first_norm_1(x), deterministic=deterministic).astype(self.dtype)
        x = self.first_dense_1(x)

        features = []
        for layer in self.layers:
            x = layer(x, deterministic)
            features.append(x)

        x = self.drop(self.last_norm_0(x), deterministic=deterministic).astype(self.dtype)
        x = self.last_norm_1(exact_gelu(self.last_dense(x)))

        # Tied head, computed only for the kept positions and rows.
        k = self.num_logits
        table = self.embedding_table()[:k].astype(self.dtype)
        logits = jnp.einsum("bld,kd->blk", x[:, : self.num_tokens].astype(self.dtype), table)
        logits = logits.astype(jnp.float32) + self.bias[: self.num_tokens, :k]
        if return_features:
            return logits, tuple(features)
        return logits


def _cfg_get(cfg: Any, key: str, default=None):
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def maskgit_transformer_from_cfg(cfg: Mapping[str, Any], **overrides) -> MaskGITTransformer:
    """Builds the module from `MaskTransformer`'s constructor arguments (img_size,
    hidden_dim, codebook_size, depth, heads, mlp_dim, dropout, nclass); missing keys take
    the constructor's defaults (note: heads=8 there; Di[M]O's teacher uses 16, see
    IMAGENET256_CFG). Keyword overrides (dtype, remat, dropout) win."""
    unknown = set(cfg) - set(_TORCH_DEFAULTS) if isinstance(cfg, Mapping) else set()
    if unknown:
        raise ValueError(f"unknown MaskTransformer config keys {sorted(unknown)}; known: {sorted(_TORCH_DEFAULTS)}")
    kwargs = {}
    for key, default in _TORCH_DEFAULTS.items():
        value = _cfg_get(cfg, key, default)
        kwargs[key] = float(value) if key == "dropout" else int(value)
    kwargs.update(overrides)
    return MaskGITTransformer(**kwargs)


def maskgit_expected_params(model: MaskGITTransformer) -> Any:
    """Param shapes of `model` (jax.eval_shape; nothing is allocated)."""
    tokens = jnp.zeros((1, model.num_tokens), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, labels))
    return variables["params"]
