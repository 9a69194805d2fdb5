"""MaskGen's multi-step text-to-image sampling (the original's `MaskGen_VQ.generate`), jitted,
and a one-step sampler for a distilled MaskGen student.

Multi-step, per step s = 0..N-1 with r = (s+1)/N:
- guidance: logits = cond + (cond − uncond)·g(r) from one forward over [cond; null] text;
  "cosine" decay g(r) = (G − 1)·(1 − cos(π·r^pow))/2 + 1 ("linear", "flippedcosine",
  "none" as in the original);
- logits /= T(r), T(r) = 0.5 + 0.8·(1 − r) with softmax_temperature_annealing, else the
  annealed Gumbel temperature t(r) = randomize_temperature·(1 − r);
- sampled = argmax(logits + t(r)·Gumbel) on masked positions (kept tokens stay);
- confidence = the scaled logit of the sampled token (+ t(r)·Gumbel with prob_sorting),
  +inf on already-kept positions;
- re-mask every position whose confidence is ≤ the mask_len-th smallest, where
  mask_len = max(1, min(#masked − 1, floor(L·arccos(r)/(π/2)))). As in the original,
  #masked is read from the FIRST sample of the batch and used for all samples.
The last step keeps every sampled token. Schedules are computed on the host in float32 the
way the original's PyTorch scalars are, so deterministic runs reproduce its token ids.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.data.prompts import tokenize_checked
from softdimo_jax.models.maskgen import MaskGenVQ, guided_logits

_GUIDANCE_DECAYS = ("linear", "cosine", "none", "flippedcosine")


class MaskGenSchedule(NamedTuple):
    cfg_scale: np.ndarray  # (N,) float32
    softmax_temperature: np.ndarray  # (N,) float32
    gumbel_temperature: np.ndarray  # (N,) float32
    mask_len: np.ndarray  # (N,) int32, before clipping to the number of masked tokens


def maskgen_schedule(
    num_steps: int,
    seq_len: int,
    *,
    guidance_scale: float = 12.0,
    randomize_temperature: float = 1.5,
    softmax_temperature_annealing: bool = True,
    guidance_decay: str = "cosine",
    guidance_decay_scale_pow: float = 1.0,
    mask_schedule: str = "arccos",
) -> MaskGenSchedule:
    """Per-step scalars of MaskGen's sampler (float32 arithmetic, as the original's tensors)."""
    if guidance_decay not in _GUIDANCE_DECAYS:
        raise ValueError(f"guidance_decay {guidance_decay!r} not in {_GUIDANCE_DECAYS}")
    f32 = np.float32
    cfg, temp, gtemp, mlen = [], [], [], []
    for step in range(num_steps):
        ratio = 1.0 * (step + 1) / num_steps
        annealed = randomize_temperature * (1.0 - ratio)
        if guidance_decay in ("cosine", "flippedcosine"):
            rp = f32(np.power(f32(ratio), f32(guidance_decay_scale_pow), dtype=f32))
            c = np.cos(f32(rp * f32(math.pi)), dtype=f32)
            step_scale = f32(f32(1) - c) / f32(2) if guidance_decay == "cosine" else f32(c) / f32(2)
            scale = f32(f32(guidance_scale - 1) * step_scale) + f32(1)
        elif guidance_decay == "linear":
            scale = ratio * (guidance_scale - 1) + 1
        else:
            scale = guidance_scale
        cfg.append(f32(scale))
        temp.append(f32(0.5 + 0.8 * (1 - ratio)) if softmax_temperature_annealing else f32(annealed))
        gtemp.append(f32(annealed))
        mlen.append(int(np.floor(f32(seq_len) * _mask_ratio(f32(ratio), mask_schedule))))
    return MaskGenSchedule(
        np.asarray(cfg, np.float32), np.asarray(temp, np.float32),
        np.asarray(gtemp, np.float32), np.asarray(mlen, np.int32),
    )


def _mask_ratio(r: np.float32, mode: str) -> np.float32:
    f32 = np.float32
    if mode == "arccos":
        return f32(np.arccos(r, dtype=f32) / f32(math.pi * 0.5))
    if mode == "cosine":
        return f32(np.cos(f32(r * f32(math.pi * 0.5)), dtype=f32))
    if mode == "linear":
        return f32(1 - r)
    if mode == "square":
        return f32(1 - r * r)
    if mode == "root":
        return f32(1 - np.sqrt(r, dtype=f32))
    raise ValueError(f"mask schedule {mode!r} not in arccos, cosine, linear, square, root")


def _gumbel(key, shape):
    u = jax.random.uniform(key, shape, jnp.float32)
    log = lambda t: jnp.log(jnp.maximum(t, 1e-20))
    return -log(-log(u))


@functools.partial(
    jax.jit,
    static_argnames=("model", "num_steps", "guidance_scale", "randomize_temperature",
                     "softmax_temperature_annealing", "guidance_decay", "guidance_decay_scale_pow",
                     "prob_sorting", "mask_schedule", "return_trace"),
)
def maskgen_generate(
    model: MaskGenVQ,
    params: Any,
    condition,
    condition_pooled,
    none_condition,
    none_condition_pooled,
    rng=None,
    aesthetic_score=6.5,
    *,
    num_steps: int = 16,
    guidance_scale: float = 12.0,
    randomize_temperature: float = 1.5,
    softmax_temperature_annealing: bool = True,
    guidance_decay: str = "cosine",
    guidance_decay_scale_pow: float = 1.0,
    prob_sorting: bool = True,
    mask_schedule: str = "arccos",
    return_trace: bool = False,
):
    """MaskGen's multi-step generation (see the module docstring).

    Args:
      model, params: a MaskGenVQ and its params (the bare tree, without {'params': ...}).
      condition (B, T, TW), condition_pooled (B, 1, TW): the captions' OpenCLIP condition.
      none_condition (1 or B, T, TW), none_condition_pooled: the empty caption's (null) one.
      rng: PRNG key for the Gumbel noise; may be None when randomize_temperature == 0.
      aesthetic_score: scalar or (B,), used for both halves of the guided batch (the original
        fills it from its config's `sample_aesthetic_score`).
    Returns:
      ids (B, L) int32; with return_trace also a dict of per-step `input_ids` (N, 2B, L),
      `logits` (N, 2B, L, K) (the raw forward over [cond; null]) and `aesthetic` (N, 2B).
    """
    b = condition.shape[0]
    L, M = model.seq_len, model.mask_token_id
    if rng is None:
        if randomize_temperature != 0:
            raise ValueError("maskgen_generate needs rng when randomize_temperature != 0")
        rng = jax.random.PRNGKey(0)  # the noise is multiplied by 0
    sched = maskgen_schedule(
        num_steps, L, guidance_scale=guidance_scale, randomize_temperature=randomize_temperature,
        softmax_temperature_annealing=softmax_temperature_annealing, guidance_decay=guidance_decay,
        guidance_decay_scale_pow=guidance_decay_scale_pow, mask_schedule=mask_schedule,
    )
    guided = not (guidance_decay == "none" and guidance_scale == 0)
    none_c = jnp.broadcast_to(none_condition, (b,) + none_condition.shape[1:])
    none_p = jnp.broadcast_to(none_condition_pooled, (b,) + none_condition_pooled.shape[1:])
    aes = jnp.broadcast_to(jnp.asarray(aesthetic_score, jnp.float32).reshape(-1), (b,))
    if guided:
        cond2 = jnp.concatenate([condition, none_c], axis=0)
        pooled2 = jnp.concatenate([condition_pooled, none_p], axis=0)
        aes2 = jnp.concatenate([aes, aes], axis=0)
    else:
        cond2, pooled2, aes2 = condition, condition_pooled, aes

    def step(carry, xs):
        ids, key = carry
        cfg, temp, gtemp, mlen, is_last = xs
        key, k_sample, k_conf = jax.random.split(key, 3)
        is_mask = ids == M
        inp = jnp.concatenate([ids, ids], axis=0) if guided else ids
        raw = model.apply({"params": params}, inp, cond2, pooled2, aes2)
        logits = guided_logits(raw[:b], raw[b:], cfg) if guided else raw
        logits = logits / temp
        sampled = jnp.argmax(logits + gtemp * _gumbel(k_sample, logits.shape), axis=-1)
        sampled_logits = jnp.take_along_axis(logits, sampled[..., None], axis=-1)[..., 0]
        sampled = jnp.where(is_mask, sampled, ids)
        sampled_logits = jnp.where(is_mask, sampled_logits, jnp.inf)
        # The original takes the masked count of the first sample for the whole batch.
        n_masked0 = jnp.sum(is_mask[0]).astype(jnp.int32)
        mask_len = jnp.maximum(1, jnp.minimum(n_masked0 - 1, mlen))
        conf = sampled_logits + gtemp * _gumbel(k_conf, sampled_logits.shape) if prob_sorting else sampled_logits
        cut = jnp.take(jnp.sort(conf, axis=-1), mask_len - 1, axis=-1)[:, None]
        remasked = jnp.where(conf <= cut, M, sampled)
        new_ids = jnp.where(is_last, sampled, remasked).astype(jnp.int32)
        trace = (inp, raw, aes2) if return_trace else None
        return (new_ids, key), trace

    ids0 = jnp.full((b, L), M, jnp.int32)
    is_last = np.arange(num_steps) == num_steps - 1
    xs = (jnp.asarray(sched.cfg_scale), jnp.asarray(sched.softmax_temperature),
          jnp.asarray(sched.gumbel_temperature), jnp.asarray(sched.mask_len), jnp.asarray(is_last))
    (ids, _), trace = jax.lax.scan(step, (ids0, rng), xs)
    if return_trace:
        return ids, {"input_ids": trace[0], "logits": trace[1], "aesthetic": trace[2]}
    return ids


@functools.partial(jax.jit, static_argnames=("model", "r_init", "sigma", "temperature"))
def maskgen_one_step(
    model: MaskGenVQ,
    params: Any,
    condition,
    condition_pooled,
    rng,
    aesthetic_score=6.5,
    *,
    r_init: float = 0.5,
    sigma: float = 0.3,
    temperature: float = 1.0,
):
    """One-step generation with a distilled MaskGen student (Di[M]O's initial state, SPEC §1.1):
    uniform random codes, exactly round(r_init·L) of them set to MASK, embedded, embeddings
    perturbed e <- sigma·eps + sqrt(1 − sigma²)·e, one forward, tokens ~ softmax(z / T)
    (T = 0 takes the argmax). Returns (ids (B, L), logits (B, L, K))."""
    b, L, K = condition.shape[0], model.seq_len, model.codebook_size
    k_tok, k_perm, k_eps, k_samp = jax.random.split(rng, 4)
    tokens = jax.random.randint(k_tok, (b, L), 0, K)
    k0 = int(round(r_init * L))
    order = jnp.argsort(jax.random.uniform(k_perm, (b, L)), axis=-1)
    tokens = jnp.where(jnp.argsort(order, axis=-1) < k0, model.mask_token_id, tokens)
    emb = model.apply({"params": params}, tokens, method=MaskGenVQ.embed_tokens)
    eps = jax.random.normal(k_eps, emb.shape, emb.dtype)
    emb = sigma * eps + math.sqrt(1.0 - sigma * sigma) * emb
    logits = model.apply({"params": params}, None, condition, condition_pooled, aesthetic_score,
                         input_embeddings=emb)
    if temperature == 0:
        ids = jnp.argmax(logits, axis=-1)
    else:
        ids = jax.random.categorical(k_samp, logits / temperature, axis=-1)
    return ids.astype(jnp.int32), logits


class CaptionConditions(NamedTuple):
    condition: Any  # (B, T, W) penultimate OpenCLIP tokens: MaskGen's condition
    condition_pooled: Any  # (B, 1, E)
    text_guidance: Any  # (B, T, W) final-LN tokens: TA-TiTok's decoder input
    null_condition: Any  # (1, T, W) the empty caption's, for CFG
    null_condition_pooled: Any  # (1, 1, E)
    null_text_guidance: Any  # (1, T, W)


def encode_captions(clip_model, clip_params, tokenizer, captions) -> CaptionConditions:
    """Captions -> MaskGen / TA-TiTok text inputs, with the empty caption's as the null
    condition (one forward over captions + [""], as the original's generate())."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    ids = jnp.asarray(tokenize_checked(clip_model, tokenizer, captions + [""]))
    out = _clip_forward(clip_model, clip_params, ids)
    return CaptionConditions(
        out.penultimate[:-1], out.pooled[:-1], out.text_guidance[:-1],
        out.penultimate[-1:], out.pooled[-1:], out.text_guidance[-1:],
    )


@functools.partial(jax.jit, static_argnames=("clip_model",))
def _clip_forward(clip_model, clip_params, ids):
    return clip_model.apply({"params": clip_params}, ids)


def one_step_images(
    maskgen: MaskGenVQ,
    maskgen_params: Any,
    tatitok,
    tatitok_params: Any,
    conditions: CaptionConditions,
    rng,
    aesthetic_score=6.5,
    *,
    r_init: float = 0.5,
    sigma: float = 0.3,
    temperature: float = 1.0,
    soft: bool = False,
):
    """Captions' conditions -> one-step student images, NHWC in [0, 1] (clipped).

    soft=False decodes the sampled token ids; soft=True decodes the decoder-side soft
    embedding softmax(z / temperature) @ codebook (the Soft-Di[M]O relaxation).
    Returns (images, ids)."""
    if tatitok.codebook_size != maskgen.codebook_size or tatitok.num_latent_tokens != maskgen.seq_len:
        raise ValueError(
            f"tokenizer ({tatitok.num_latent_tokens} tokens of {tatitok.codebook_size} codes) does not fit "
            f"the generator ({maskgen.seq_len} tokens of {maskgen.codebook_size} codes)"
        )
    ids, logits = maskgen_one_step(
        maskgen, maskgen_params, conditions.condition, conditions.condition_pooled, rng, aesthetic_score,
        r_init=r_init, sigma=sigma, temperature=temperature,
    )
    probs = jax.nn.softmax(logits / max(temperature, 1e-6), axis=-1) if soft else None
    images = _decode(tatitok, tatitok_params, ids, probs, conditions.text_guidance)
    return images, ids


@functools.partial(jax.jit, static_argnames=("tatitok",))
def _decode(tatitok, params, ids, probs, text_guidance):
    v = {"params": params}
    if probs is None:
        images = tatitok.apply(v, ids, text_guidance, method=type(tatitok).decode_tokens)
    else:
        images = tatitok.apply(v, probs, text_guidance, method=type(tatitok).decode_soft)
    return jnp.clip(images, 0.0, 1.0)
