"""Masking of token sequences: the one mask schedule and the exact-count masks.

Every phase masks with these functions: teacher training (Bernoulli(r) per sub-token),
Di[M]O's initial state and forward process (exact counts), and the GAN corruption of real
and fake inputs (exact counts, r ~ U[0, r_max]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASK_SCHEDULES = ("arccos", "cosine", "linear")


def mask_ratio(u, schedule: str = "arccos"):
    """Fraction of masked positions for u ~ U(0, 1) (traceable)."""
    if schedule == "arccos":
        return jnp.arccos(u) / (math.pi / 2)
    if schedule == "cosine":
        return jnp.cos(u * math.pi / 2)
    if schedule == "linear":
        return 1.0 - u
    raise ValueError(f"unknown mask schedule {schedule!r}; use one of {MASK_SCHEDULES}")


def exact_count_mask(rng, counts, batch: int, length: int, splits: int, mode: str):
    """(B, L, S) bool with exactly counts[b] true positions per sample (and per split in
    'split' mode), chosen by ranking uniform noise."""
    if mode == "position":
        noise = jax.random.uniform(rng, (batch, length))
        ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
        mask = ranks < counts[:, None]
        return jnp.broadcast_to(mask[:, :, None], (batch, length, splits))
    if mode == "split":
        noise = jax.random.uniform(rng, (batch, length, splits))
        ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
        return ranks < counts[:, None, None]
    raise ValueError(f"unknown mask mode {mode!r}; use 'position' or 'split'")


def forward_mask(rng, batch: int, length: int, splits: int, schedule: str, mode: str):
    """The teacher's forward process: r = schedule(u), k = max(1, round(r·L)) per sample."""
    k_u, k_pos = jax.random.split(rng)
    r = mask_ratio(jax.random.uniform(k_u, (batch,)), schedule)
    counts = jnp.maximum(1, jnp.round(r * length)).astype(jnp.int32)
    return exact_count_mask(k_pos, counts, batch, length, splits, mode)


def random_position_mask(rng, batch: int, length: int, r_max: float):
    """Per sample r ~ U[0, r_max]; exactly round(r·L) positions masked.
    -> (mask (B, L) bool, r_eff (B,) = masked count / L, the value GAN heads condition on)."""
    if not 0.0 <= r_max < 1.0:
        raise ValueError(f"gan r_max must be in [0, 1), got {r_max}")
    r_rng, n_rng = jax.random.split(rng)
    r = jax.random.uniform(r_rng, (batch,), minval=0.0, maxval=r_max)
    k = jnp.round(r * length).astype(jnp.int32)
    mask = exact_count_mask(n_rng, k, batch, length, 1, "position")[..., 0]
    return mask, k.astype(jnp.float32) / length


def bernoulli_subtoken_mask(rng, sub_tokens, mask_token: int, schedule: str = "arccos"):
    """Teacher training: (B, L, S) ids -> (masked ids, mask (B, L, S) bool), each sub-token
    masked independently with probability r = schedule(u), one u per sample."""
    k_r, k_m = jax.random.split(rng)
    b = sub_tokens.shape[0]
    r = mask_ratio(jax.random.uniform(k_r, (b,)), schedule)
    mask = jax.random.uniform(k_m, sub_tokens.shape) < r[:, None, None]
    return jnp.where(mask, mask_token, sub_tokens), mask


def initial_tokens(rng, batch: int, adapter, r_init: float, mode: str = "position", conditions=None):
    """Labels (B,) and the generator's initial tokens (B, L, S): uniform over V, exactly
    round(r_init·L) positions MASKed.

    Adapters with `draw_labels(rng, batch, conditions)` (text conditions) draw their own
    labels, any pytree with a leading batch axis, from the step's `conditions` batch."""
    k_y, k_x, k_m = jax.random.split(rng, 3)
    length, splits = adapter.num_tokens, adapter.splits
    if hasattr(adapter, "draw_labels"):
        labels = adapter.draw_labels(k_y, batch, conditions)
    else:
        labels = jax.random.randint(k_y, (batch,), 0, adapter.num_classes)
    tokens = jax.random.randint(k_x, (batch, length, splits), 0, adapter.vocab_size)
    k0 = int(round(r_init * length))
    mask = exact_count_mask(k_m, jnp.full((batch,), k0, jnp.int32), batch, length, splits, mode)
    return labels, jnp.where(mask, adapter.mask_token, tokens)


def mask_positions(bits, mask):
    """(B, L, bits) with (B, L) mask -> MASK (all-zero bits) where mask is true."""
    return jnp.where(mask[..., None], jnp.zeros((), bits.dtype), bits)
