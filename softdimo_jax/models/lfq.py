"""Lookup-free quantisation (LFQ) bit arithmetic shared by the MaskBit tokenizer and teacher.

A token index i of `num_bits` bits has bit vector b_k = 2·((i >> k) & 1) − 1 ∈ {−1, +1}
(bit 0 first). MaskBit factorises it into S splits of `num_bits // S` bits each; split 0
holds the low bits. The teacher's MASK sub-token is `2 ** bits_per_split`, and its bit
vector is all zeros. Bits of the splits are concatenated split-major, as MaskBit's
`rearrange("b n m c -> b n (m c)")` does.
"""

from __future__ import annotations

import jax.numpy as jnp


def bits_per_split(num_bits: int, splits: int) -> int:
    if num_bits % splits:
        raise ValueError(f"{num_bits} bits cannot be split evenly into {splits} splits")
    return num_bits // splits


def mask_id(num_bits: int, splits: int) -> int:
    """The teacher's MASK sub-token id: one past the last real sub-token."""
    return 2 ** bits_per_split(num_bits, splits)


def indices_to_bits(indices, num_bits: int, dtype=jnp.float32):
    """(...,) int -> (..., num_bits) in {−1, +1}, bit 0 first."""
    shifts = jnp.arange(num_bits, dtype=jnp.int32)
    bits = (jnp.asarray(indices, jnp.int32)[..., None] >> shifts) & 1
    return (2 * bits - 1).astype(dtype)


def bits_to_indices(bits):
    """(..., num_bits) real -> (...,) int32: bit k is set where bits[..., k] > 0."""
    num_bits = bits.shape[-1]
    weights = (2 ** jnp.arange(num_bits, dtype=jnp.int32)).astype(jnp.int32)
    return jnp.sum((bits > 0).astype(jnp.int32) * weights, axis=-1)


def split_indices(indices, num_bits: int, splits: int):
    """(...,) full token ids -> (..., S) sub-token ids, split 0 = low bits."""
    bps = bits_per_split(num_bits, splits)
    shifts = bps * jnp.arange(splits, dtype=jnp.int32)
    return (jnp.asarray(indices, jnp.int32)[..., None] >> shifts) & (2**bps - 1)


def merge_splits(sub_tokens, num_bits: int, splits: int):
    """(..., S) sub-token ids -> (...,) full token ids (inverse of split_indices)."""
    bps = bits_per_split(num_bits, splits)
    shifts = bps * jnp.arange(splits, dtype=jnp.int32)
    return jnp.sum(jnp.asarray(sub_tokens, jnp.int32) << shifts, axis=-1)


def subtokens_to_bits(sub_tokens, num_bits: int, splits: int, dtype=jnp.float32):
    """(..., S) sub-token ids (MASK allowed) -> (..., num_bits) split-major; MASK -> zeros."""
    bps = bits_per_split(num_bits, splits)
    sub_tokens = jnp.asarray(sub_tokens, jnp.int32)
    is_mask = sub_tokens >= 2**bps
    bits = indices_to_bits(jnp.where(is_mask, 0, sub_tokens), bps, dtype)
    bits = jnp.where(is_mask[..., None], jnp.zeros((), dtype), bits)
    return bits.reshape(*sub_tokens.shape[:-1], splits * bps)


def split_codebook(bits_per_split_: int, dtype=jnp.float32):
    """(2**bps, bps) ±1 table: row c is the bit vector of sub-token c (for soft embeddings)."""
    return indices_to_bits(jnp.arange(2**bits_per_split_), bits_per_split_, dtype)
