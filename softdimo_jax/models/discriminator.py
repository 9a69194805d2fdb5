"""Light discriminator heads on frozen-teacher features (Soft-Di[M]O GAN refinement, SPEC §1.3).

The teacher does the heavy lifting: real and fake token embeddings (partly masked) go
through the frozen teacher, which returns every layer's hidden states (B, L+1, d) (the
class token is the last position). One small head per tapped layer reads those features
and outputs a real/fake logit, conditioned on

- the mask fraction r the inputs were corrupted with (Fourier features -> FiLM on the
  head's hidden units), and
- the class label (projection conditioning, Miyato & Koyama 2018: logit = w·φ + <E[c], φ>).

The paper does not publish which layers are tapped or the head shape; both are config.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def fourier_features(r, dim: int):
    """(B,) scalars in [0, 1] -> (B, dim) sin/cos features at geometric frequencies."""
    if dim % 2:
        raise ValueError(f"fourier feature dim must be even, got {dim}")
    freqs = jnp.exp(jnp.linspace(0.0, math.log(64.0), dim // 2))  # 1 .. 64 cycles over [0, 1]
    angles = 2.0 * math.pi * jnp.asarray(r, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class DiscriminatorHead(nn.Module):
    """One head: per-token MLP (LN -> Dense -> FiLM(r) -> LeakyReLU -> Dense -> LeakyReLU),
    mean over the image tokens, then an unconditional plus a class-projection logit."""

    hidden_dim: int
    num_classes: int
    r_embed_dim: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats, r, labels):
        x = nn.LayerNorm(dtype=self.dtype, name="norm")(feats.astype(self.dtype))
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
        # FiLM from r; zero-initialised so every head starts unconditional on r.
        film = nn.Dense(2 * self.hidden_dim, kernel_init=nn.initializers.zeros, name="r_film")(
            fourier_features(r, self.r_embed_dim)
        )
        scale, shift = jnp.split(film.astype(self.dtype), 2, axis=-1)
        x = x * (1.0 + scale[:, None, :]) + shift[:, None, :]
        x = nn.leaky_relu(x, 0.2)
        x = nn.leaky_relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc2")(x), 0.2)
        phi = jnp.mean(x.astype(jnp.float32), axis=1)  # (B, hidden)
        out = nn.Dense(1, name="out")(phi)[:, 0]
        class_emb = nn.Embed(
            self.num_classes, self.hidden_dim, embedding_init=nn.initializers.normal(0.02), name="class_proj"
        )(labels)
        return out + jnp.sum(class_emb * phi, axis=-1) / math.sqrt(self.hidden_dim)


class FeatureDiscriminator(nn.Module):
    """Heads on a configurable set of teacher layers.

    `layers` index the teacher's per-layer feature tuple (negative indices count from the
    end). `num_tokens` is L: the trailing class-token position (L+1 features) is dropped
    so heads see only image tokens. Returns logits (B, n_heads).
    """

    layers: Sequence[int]
    num_tokens: int
    num_classes: int
    hidden_dim: int = 256
    r_embed_dim: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, r, labels):
        if not isinstance(features, (tuple, list)):
            raise TypeError("features must be the teacher's tuple of per-layer hidden states "
                            "(call the teacher with return_features=True)")
        if not self.layers:
            raise ValueError("FeatureDiscriminator needs at least one tapped layer (config gan.disc_layers)")
        n = len(features)
        labels = jnp.asarray(labels, jnp.int32)
        logits = []
        for i, layer in enumerate(self.layers):
            if not -n <= layer < n:
                raise ValueError(f"discriminator tap layer {layer} out of range for a {n}-layer teacher")
            feats = features[layer]
            if feats.shape[1] < self.num_tokens:
                raise ValueError(f"layer {layer} features have {feats.shape[1]} positions, "
                                 f"expected at least num_tokens={self.num_tokens}")
            head = DiscriminatorHead(self.hidden_dim, self.num_classes, self.r_embed_dim, self.dtype,
                                     name=f"head_{i}")
            logits.append(head(feats[:, : self.num_tokens], r, labels))
        return jnp.stack(logits, axis=-1).astype(jnp.float32)


def discriminator_from_config(gan_config, num_tokens: int, num_classes: int) -> FeatureDiscriminator:
    """Builds the heads from a GAN-phase ConfigDict (disc_layers, disc_hidden, disc_r_embed)."""
    return FeatureDiscriminator(
        layers=tuple(int(x) for x in gan_config.disc_layers),
        num_tokens=int(num_tokens),
        num_classes=int(num_classes),
        hidden_dim=int(gan_config.disc_hidden),
        r_embed_dim=int(gan_config.get("disc_r_embed", 32)),
    )


def init_discriminator(disc: FeatureDiscriminator, rng, features, batch: int):
    """Params for `disc` given example teacher features (arrays or ShapeDtypeStructs)."""
    feats = tuple(jnp.zeros(f.shape, jnp.float32) for f in features)
    return disc.init(rng, feats, jnp.zeros((batch,)), jnp.zeros((batch,), jnp.int32))["params"]
