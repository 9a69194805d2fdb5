"""Meissonic's multi-step sampler (its `Pipeline.__call__` + `Scheduler.step`), jitted.

Per step i of N (model timestep N−1−i, which the model multiplies by 1000):
- one forward over [negative; positive] (identical ids, micro-conditions and timestep) when
  guidance_scale > 1, guided = uncond + s·(cond − uncond);
- p = softmax(guided) over the K codes; one categorical draw per position; known tokens kept;
- at the last step (timestep 0) the draws are the result; otherwise
  mask_len = max(1, min(#masked − 1, floor(L·cos(π/2·(i+1)/N)))) per sample,
  confidence = log(max(p[drawn], 1e-20)) + τᵢ·Gumbel with p = float32 max at known
  positions, and the positions whose confidence is strictly below the mask_len-th
  (0-based) smallest are re-masked.
τ = linspace(τ₀, τ₁, N) for a pair (default (2, 0)), linspace(τ, 0.01, N) for a number,
computed the way torch.linspace computes float32. The draws come from `rng`, or, to
replay the original, from `recorded` = {'sampled_ids': (N, B, H, W), 'gumbel': (N−1, B, H·W)}.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.models.meissonic import MeissonicTransformer, guided_logits

_F32_MAX = float(np.finfo(np.float32).max)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: start + i·step for the first half, end − (N−1−i)·step after."""
    f32 = np.float32
    if steps == 1:
        return np.asarray([start], np.float32)
    step = f32(f32(end) - f32(start)) / f32(steps - 1)
    out = [f32(start) + f32(i) * step if i < steps // 2 else f32(end) - f32(steps - i - 1) * step
           for i in range(steps)]
    return np.asarray(out, np.float32)


def temperatures(temperature: float | Sequence[float], num_steps: int) -> np.ndarray:
    """The scheduler's per-step Gumbel temperatures (set_timesteps)."""
    if isinstance(temperature, (tuple, list)):
        if len(temperature) != 2:
            raise ValueError(f"temperature must be a number or a pair (start, end), got {temperature!r}")
        return torch_linspace_f32(float(temperature[0]), float(temperature[1]), num_steps)
    return torch_linspace_f32(float(temperature), 0.01, num_steps)


def base_mask_lengths(num_steps: int, seq_len: int) -> np.ndarray:
    """floor(L·cos(π/2·(i+1)/N)) per step, in float32 like the scheduler's tensors."""
    f32 = np.float32
    out = []
    for i in range(num_steps):
        ratio = f32(i + 1) / f32(num_steps)
        ratio = f32(ratio * f32(math.pi)) / f32(2)
        out.append(int(np.floor(f32(seq_len) * np.cos(ratio, dtype=f32))))
    return np.asarray(out, np.int32)


def pipeline_micro_conds(batch: int, width: int = 1024, height: int = 1024, crop=(0, 0),
                         aesthetic_score: float = 6.0):
    """(batch, 5) micro-conditions in the pipeline's order: width, height, crop top, crop left, aesthetic."""
    row = np.asarray([width, height, crop[0], crop[1], aesthetic_score], np.float32)
    return jnp.asarray(np.broadcast_to(row, (batch, 5)))


def _gumbel_from_uniform(u):
    log = lambda t: jnp.log(jnp.maximum(t, 1e-20))
    return -log(-log(u))


@functools.partial(jax.jit, static_argnames=("model", "grid", "num_steps", "guidance_scale", "temperature",
                                             "return_trace"))
def meissonic_generate(
    model: MeissonicTransformer,
    params: Any,
    prompt_embeds,
    encoder_hidden_states,
    negative_prompt_embeds=None,
    negative_encoder_hidden_states=None,
    micro_conds=None,
    rng=None,
    recorded=None,
    *,
    grid: tuple[int, int] = (64, 64),
    num_steps: int = 48,
    guidance_scale: float = 9.0,
    temperature: float | tuple[float, float] = (2.0, 0.0),
    return_trace: bool = False,
):
    """Meissonic's multi-step generation from all-MASK ids.

    Args:
      model, params: a MeissonicTransformer and its params (the bare tree).
      prompt_embeds (B, P), encoder_hidden_states (B, T, D): the prompts' CLIP text
        (pooled projection; penultimate hidden states).
      negative_*: the negative prompt's, (B or 1, ...); needed when guidance_scale > 1.
      micro_conds: (B, 5) or (5,) (default: 1024, 1024, 0, 0, 6); the same for both halves.
      rng: PRNG key for the categorical draws and the Gumbel noise, or
      recorded: {'sampled_ids': (N, B, H, W), 'gumbel': (N−1, B, H·W)} (the original's draws).
      grid: (H, W) token grid (64×64 at 1024 px).
    Returns:
      ids (B, H, W) int32; with return_trace also a dict of per-step `input_ids`, `timestep`,
      `logits` ((N, 2B, H, W, K) for [negative; positive]), `guided_logits`, `mask_len`
      (N, B; the last step's is 0) and `output_ids`.
    """
    if (rng is None) == (recorded is None):
        raise ValueError("meissonic_generate takes exactly one of rng or recorded draws")
    b = prompt_embeds.shape[0]
    h, w = grid
    L, M, K = h * w, model.mask_token_id, model.codebook_size
    guided = guidance_scale > 1.0
    if micro_conds is None:
        micro_conds = pipeline_micro_conds(b)
    micro = jnp.broadcast_to(jnp.asarray(micro_conds, jnp.float32).reshape(-1, 5), (b, 5))
    if guided:
        if negative_prompt_embeds is None or negative_encoder_hidden_states is None:
            raise ValueError("guidance_scale > 1 needs the negative prompt's embeddings")
        neg_p = jnp.broadcast_to(negative_prompt_embeds, (b,) + negative_prompt_embeds.shape[1:])
        neg_c = jnp.broadcast_to(negative_encoder_hidden_states, (b,) + negative_encoder_hidden_states.shape[1:])
        pooled2 = jnp.concatenate([neg_p, prompt_embeds], axis=0)
        ctx2 = jnp.concatenate([neg_c, encoder_hidden_states], axis=0)
        micro2 = jnp.concatenate([micro, micro], axis=0)
    else:
        pooled2, ctx2, micro2 = prompt_embeds, encoder_hidden_states, micro
    taus = temperatures(temperature, num_steps)
    base = base_mask_lengths(num_steps, L)
    if recorded is not None:
        sampled_all = jnp.asarray(recorded["sampled_ids"], jnp.int32).reshape(num_steps, b, L)
        gumbel_all = jnp.concatenate([jnp.asarray(recorded["gumbel"], jnp.float32).reshape(num_steps - 1, b, L),
                                      jnp.zeros((1, b, L), jnp.float32)])
        keys = jnp.zeros((num_steps, 2), jnp.uint32)
    else:
        sampled_all = jnp.zeros((num_steps, b, L), jnp.int32)
        gumbel_all = jnp.zeros((num_steps, b, L), jnp.float32)
        keys = jax.random.split(rng, num_steps)

    def step(ids, xs):
        i, tau, mlen, rec_sampled, rec_gumbel, key = xs
        timestep = (num_steps - 1 - i).astype(jnp.float32)
        inp = jnp.concatenate([ids, ids], axis=0) if guided else ids
        raw = model.apply({"params": params}, inp.reshape(-1, h, w), ctx2, pooled2, micro2, timestep)
        logits = guided_logits(raw[b:], raw[:b], guidance_scale) if guided else raw
        logits = logits.reshape(b, L, K).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        unknown = ids == M
        if recorded is not None:
            drawn, gumbel = rec_sampled, rec_gumbel
        else:
            k_draw, k_gumbel = jax.random.split(key)
            drawn = jax.random.categorical(k_draw, logits, axis=-1).astype(jnp.int32)
            gumbel = _gumbel_from_uniform(jax.random.uniform(k_gumbel, (b, L), jnp.float32))
        pred = jnp.where(unknown, drawn, ids)
        mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(unknown, axis=-1) - 1, mlen)).astype(jnp.int32)
        p_sel = jnp.take_along_axis(probs, pred[..., None], axis=-1)[..., 0]
        p_sel = jnp.where(unknown, p_sel, _F32_MAX)
        conf = jnp.log(jnp.maximum(p_sel, 1e-20)) + tau * gumbel
        cut = jnp.take_along_axis(jnp.sort(conf, axis=-1), mask_len[:, None], axis=-1)
        remasked = jnp.where(conf < cut, M, pred)
        is_last = i == num_steps - 1
        new_ids = jnp.where(is_last, pred, remasked).astype(jnp.int32)
        trace = None
        if return_trace:
            trace = dict(input_ids=ids.reshape(b, h, w), timestep=num_steps - 1 - i, logits=raw,
                         guided_logits=logits.reshape(b, h, w, K), mask_len=jnp.where(is_last, 0, mask_len),
                         output_ids=new_ids.reshape(b, h, w))
        return new_ids, trace

    ids0 = jnp.full((b, L), M, jnp.int32)
    xs = (jnp.arange(num_steps), jnp.asarray(taus), jnp.asarray(base), sampled_all, gumbel_all, keys)
    ids, trace = jax.lax.scan(step, ids0, xs)
    ids = ids.reshape(b, h, w)
    return (ids, trace) if return_trace else ids


def dimo_initial_tokens(rng, batch: int, grid: tuple[int, int], codebook_size: int, mask_token_id: int,
                        r_init: float = 0.5):
    """Di[M]O's initial state for Meissonic: uniform random codes, exactly
    max(1, round(r_init·L)) of them (a random permutation per sample) set to MASK."""
    h, w = grid
    L = h * w
    k_tok, k_perm = jax.random.split(rng)
    tokens = jax.random.randint(k_tok, (batch, L), 0, codebook_size)
    n_masked = max(1, int(round(L * r_init)))
    rank = jnp.argsort(jax.random.uniform(k_perm, (batch, L)), axis=-1)
    tokens = jnp.where(rank < n_masked, mask_token_id, tokens)
    return tokens.reshape(batch, h, w).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "grid", "r_init", "noise_emb_perturb", "temperature"))
def meissonic_one_step(
    model: MeissonicTransformer,
    params: Any,
    prompt_embeds,
    encoder_hidden_states,
    rng,
    micro_conds=None,
    *,
    grid: tuple[int, int] = (64, 64),
    r_init: float = 0.5,
    noise_emb_perturb: float = 0.3,
    temperature: float = 1.0,
):
    """One-step generation with a Di[M]O Meissonic student (its `generate_one_step`): initial
    tokens from `dimo_initial_tokens`, timestep long(r_init)·1000 = 0, Di[M]O's micro-conditions
    [1024, 1024, 0, 0, 6] unless given, the embedding perturbed with p = noise_emb_perturb, one
    forward, tokens ~ softmax(z / T) (T = 0 takes the argmax). Returns (ids (B, H, W), logits (B, H, W, K))."""
    b = prompt_embeds.shape[0]
    k_init, k_eps, k_samp = jax.random.split(rng, 3)
    tokens = dimo_initial_tokens(k_init, b, grid, model.codebook_size, model.mask_token_id, r_init)
    if micro_conds is None:
        micro_conds = pipeline_micro_conds(b, aesthetic_score=6.0)
    micro = jnp.broadcast_to(jnp.asarray(micro_conds, jnp.float32).reshape(-1, 5), (b, 5))
    noise = jax.random.normal(k_eps, tokens.shape + (model.inner_dim,), jnp.float32)
    logits = model.apply({"params": params}, tokens, encoder_hidden_states, prompt_embeds, micro,
                         jnp.zeros((b,), jnp.float32), perturb_noise=noise, noise_emb_perturb=noise_emb_perturb)
    if temperature == 0:
        ids = jnp.argmax(logits, axis=-1)
    else:
        ids = jax.random.categorical(k_samp, logits / temperature, axis=-1)
    return ids.astype(jnp.int32), logits
