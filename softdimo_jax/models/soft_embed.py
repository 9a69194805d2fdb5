"""Soft embeddings (SPEC §1.2): a differentiable stand-in for the generator's sampled tokens.

Instead of a token drawn from p = softmax(z / tau) we feed its expectation under p:
- index-embedding teachers (MaskGIT, MaskGen): e = p @ E with E the consumer's table
  (the MASK row dropped: the generator never predicts MASK);
- bit teachers (MaskBit): E[b_k] = sum_c p(c) (2 bit_k(c) - 1) per split, concatenated
  split-major like `lfq.subtokens_to_bits`. MaskBit's input projection is linear, so
  input_proj(E[bits]) = E[input_proj(bits)], and the tokenizer decoder reads the same
  tensor. MASK is the all-zero bit vector.

Baselines for the ablation sit behind `mode`:
- 'soft'      : p = softmax(z / tau)                         (the method)
- 'gumbel'    : p = softmax((z + g) / tau), g ~ Gumbel(0, 1)  (relaxed, still soft)
- 'gumbel_st' : forward one-hot(argmax(z + g)), backward through the Gumbel softmax
- 'st'        : forward one-hot(argmax z), backward through softmax(z / tau)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from softdimo_jax.models import lfq

MODES = ("soft", "gumbel", "gumbel_st", "st")


def soft_probs(logits, tau: float = 1.0, mode: str = "soft", rng=None):
    """(..., V) logits -> (..., V) weights that sum to 1 (one-hot in the forward for *_st)."""
    if mode not in MODES:
        raise ValueError(f"unknown soft-embedding mode {mode!r}; choose one of {MODES}")
    if tau <= 0:
        raise ValueError(f"soft-embedding temperature tau must be > 0, got {tau}")
    logits = jnp.asarray(logits, jnp.float32)
    if mode in ("gumbel", "gumbel_st"):
        if rng is None:
            raise ValueError(f"mode {mode!r} draws Gumbel noise and needs an rng")
        logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
    p = jax.nn.softmax(logits / tau, axis=-1)
    if mode in ("gumbel_st", "st"):
        hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=p.dtype)
        # Straight-through: the value of `hard`, the gradient of `p`.
        p = hard + (p - jax.lax.stop_gradient(p))  # exactly one-hot in the forward
    return p


def expected_embedding(probs, table):
    """p @ E: (..., V) weights and a (V', d) table with V' >= V (extra rows such as MASK are
    dropped, since the generator puts no mass on them) -> (..., d)."""
    v = probs.shape[-1]
    if table.shape[0] < v:
        raise ValueError(f"embedding table has {table.shape[0]} rows but the logits have {v} classes")
    return jnp.einsum("...v,vd->...d", probs, table[:v].astype(probs.dtype))


def expected_bits(probs):
    """MaskBit: (..., S, V) weights over the 2**bps sub-tokens of each split -> (..., S*bps)
    expected ±1 bits, split-major (split 0 = low bits first)."""
    v = probs.shape[-1]
    bps = v.bit_length() - 1
    if 2**bps != v:
        raise ValueError(f"bit teachers need 2**bits_per_split classes per split, got {v}")
    codebook = lfq.split_codebook(bps, probs.dtype)  # (V, bps) ±1
    bits = jnp.einsum("...sv,vk->...sk", probs, codebook)
    return bits.reshape(*bits.shape[:-2], bits.shape[-2] * bps)


def hard_bits(sub_tokens, num_bits: int, splits: int):
    """(..., S) sub-token ids -> (..., bits) ±1 (MASK -> 0): the hard counterpart of expected_bits."""
    return lfq.subtokens_to_bits(sub_tokens, num_bits, splits, jnp.float32)


def mask_bits(bits, mask):
    """Sets positions where `mask` (..., L) is true to the MASK bit vector (zeros)."""
    return jnp.where(jnp.asarray(mask, bool)[..., None], jnp.zeros((), bits.dtype), bits)


@dataclasses.dataclass(frozen=True)
class SoftEmbedder:
    """The relaxation used by a phase: mode + temperature (from `config.distill.soft`)."""

    mode: str = "soft"
    tau: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown soft-embedding mode {self.mode!r}; choose one of {MODES}")

    @classmethod
    def from_config(cls, soft_cfg) -> "SoftEmbedder":
        return cls(mode=str(soft_cfg.mode), tau=float(soft_cfg.tau))

    def probs(self, logits, rng=None):
        return soft_probs(logits, self.tau, self.mode, rng)

    def bits(self, logits, rng=None):
        """(B, L, S, V) generator logits -> (B, L, bits) soft bits: the teacher-side
        `input_bits` of LFQBert and, reshaped to (B, h, w, bits), the decoder-side input."""
        return expected_bits(self.probs(logits, rng))

    def teacher_embeddings(self, model, teacher_params, logits, rng=None):
        """Soft input embeddings of an LFQBert teacher: input_proj(E[bits]) (B, L, hidden)."""
        bits = self.bits(logits, rng)
        return model.apply({"params": teacher_params}, bits, method=type(model).embed_bits)

    def embeddings(self, logits, table, rng=None):
        """Index-embedding consumers: p @ E."""
        return expected_embedding(self.probs(logits, rng), table)

    def decoder_bits(self, logits, grid: tuple[int, int], rng=None):
        """(B, L, S, V) -> (B, h, w, bits) in [-1, 1] for `ConvVQModel.decode_bits`."""
        bits = self.bits(logits, rng)
        h, w = grid
        if h * w != bits.shape[1]:
            raise ValueError(f"token grid {grid} does not hold {bits.shape[1]} tokens")
        return bits.reshape(bits.shape[0], h, w, bits.shape[-1])


def decode_soft(tokenizer, tokenizer_params: Any, logits, grid, embedder: SoftEmbedder | None = None,
                rng=None):
    """The soft one-step sample as images (NHWC, [0, 1]): decoder(E[bits])."""
    embedder = embedder or SoftEmbedder()
    bits = embedder.decoder_bits(logits, grid, rng)
    return tokenizer.apply({"params": tokenizer_params}, bits, method=type(tokenizer).decode_bits)
