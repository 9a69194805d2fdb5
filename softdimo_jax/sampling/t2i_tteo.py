"""TTEO for text-to-image (SPEC §1.5) on a one-step MaskGen student + TA-TiTok decoder, or a
one-step Meissonic student + its VQ decoder.

As `sampling/tteo.py` for class-to-image: weights frozen; the generator's input embedding
e (Di[M]O's initial state: uniform codes, exactly round(r_init·L) MASK, σ-perturbed
embedding — the draws of `maskgen_sampler.maskgen_one_step` / `meissonic_sampler.
meissonic_one_step`; for Meissonic e is the perturbed output of the embedding block, where
Di[M]O's noise_emb_perturb acts) takes K plain SGD ascent steps (lr 0.2, no clipping) on
Σ_b R(Dec(softmax(G(e, c)/τ) @ C[, text_b]), c_b), then the sample is drawn from G(e_K, c)
exactly as the plain one-step sampler does. K = 0, N = 1 IS the plain sampler (same rng
use; the tests check it). Best-of-N: N ≤ 16 initial embeddings per caption (candidate 0 the
plain sampler's), the best by 'reward' or 'reward_confidence'.

`conditions`: {"condition" (B, T, W), "pooled" (B, 1, E), ["text_guidance" (B, T, W),
MaskGen only,] "reward_text": {name: per-prompt reward inputs}} — the rows of a prompt table
(`data.prompts.PromptConditions.rows`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from softdimo_jax.core.t2i_reward import check_decoder_fits, soft_decode_t2i
from softdimo_jax.models.maskgen import MaskGenVQ
from softdimo_jax.models.meissonic import DIMO_MICRO_CONDS, MeissonicTransformer
from softdimo_jax.models.soft_embed import SoftEmbedder
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.sampling.meissonic_sampler import dimo_initial_tokens
from softdimo_jax.sampling.tteo import check_tteo_settings, optimise_embeddings, tteo_cost


def maskgen_initial_embeddings(model: MaskGenVQ, params, rng, batch: int, *, r_init: float, sigma: float):
    """The one-step student's input e (B, L, d) and the sampling key, with exactly the draws
    of `maskgen_one_step` (k_tok, k_perm, k_eps, k_samp = split(rng, 4))."""
    L, K = model.seq_len, model.codebook_size
    k_tok, k_perm, k_eps, k_samp = jax.random.split(rng, 4)
    tokens = jax.random.randint(k_tok, (batch, L), 0, K)
    k0 = int(round(r_init * L))
    order = jnp.argsort(jax.random.uniform(k_perm, (batch, L)), axis=-1)
    tokens = jnp.where(jnp.argsort(order, axis=-1) < k0, model.mask_token_id, tokens)
    emb = model.apply({"params": params}, tokens, method=MaskGenVQ.embed_tokens)
    eps = jax.random.normal(k_eps, emb.shape, emb.dtype)
    return sigma * eps + math.sqrt(1.0 - sigma * sigma) * emb, k_samp


def meissonic_initial_embeddings(model: MeissonicTransformer, params, rng, batch: int, grid, *, r_init: float,
                                 sigma: float):
    """The one-step Meissonic student's input: the σ-perturbed embedding-block output e (B, H, W, C)
    (Di[M]O's noise_emb_perturb) and the sampling key, with exactly the draws of
    `meissonic_sampler.meissonic_one_step` (k_init, k_eps, k_samp = split(rng, 3))."""
    k_init, k_eps, k_samp = jax.random.split(rng, 3)
    tokens = dimo_initial_tokens(k_init, batch, tuple(grid), model.codebook_size, model.mask_token_id, r_init)
    h = model.apply({"params": params}, tokens, method=MeissonicTransformer.embed_block)
    eps = jax.random.normal(k_eps, tokens.shape + (model.inner_dim,), jnp.float32)
    # As the model's own perturbation (float32, the coefficient in float64 for a Python σ).
    e = sigma * eps + math.sqrt(1.0 - sigma * sigma) * h.astype(jnp.float32)
    return e.astype(h.dtype), k_samp


def one_step_family(generator, decoder, *, r_init: float, sigma_init: float, aesthetic_score: float = 6.5,
                    micro_conds=DIMO_MICRO_CONDS, grid=None):
    """The family-specific parts of a one-step text-to-image student, as three functions:
    initial(gp, rng, b) -> (e, k_samp), logits(gp, e, conds) -> z, hard_images(dp, ids, conds).
    MaskGen: 1-D tokens, aesthetic score, TA-TiTok guided by conds["text_guidance"]. Meissonic:
    the (H, W) token `grid`, its 5 `micro_conds`, timestep 0, its VQ decoder."""
    if isinstance(generator, MeissonicTransformer):
        if grid is None:
            raise ValueError("a Meissonic student needs its token grid (H, W) (distill.token_grid)")
        grid = tuple(int(g) for g in grid)
        micro = jnp.asarray(tuple(micro_conds), jnp.float32).reshape(1, 5)

        def initial(gp, rng, b):
            return meissonic_initial_embeddings(generator, gp, rng, b, grid, r_init=r_init, sigma=sigma_init)

        def logits(gp, e, conds):
            b = e.shape[0]
            return generator.apply({"params": gp}, None, conds["condition"], conds["pooled"].reshape(b, -1),
                                   jnp.broadcast_to(micro, (b, 5)), jnp.zeros((b,), jnp.float32), embedded=e)

        def hard_images(dp, ids, conds):
            return decoder.apply({"params": dp}, ids, method=type(decoder).decode_tokens)

        return initial, logits, hard_images
    if not isinstance(generator, MaskGenVQ):
        raise ValueError(f"text-to-image TTEO runs on MaskGen or Meissonic students, got {type(generator).__name__}")

    def initial(gp, rng, b):
        return maskgen_initial_embeddings(generator, gp, rng, b, r_init=r_init, sigma=sigma_init)

    def logits(gp, e, conds):
        aes = jnp.full((e.shape[0],), aesthetic_score, jnp.float32)
        return generator.apply({"params": gp}, None, conds["condition"], conds["pooled"], aes, input_embeddings=e)

    def hard_images(dp, ids, conds):
        return decoder.apply({"params": dp}, ids, conds["text_guidance"], method=type(decoder).decode_tokens)

    return initial, logits, hard_images


def make_t2i_tteo_sampler(generator, decoder, reward_set, *, steps: int = 2, lr: float = 0.2,
                          best_of: int = 1, select: str = "reward", confidence_weight: float = 1.0,
                          temperature: float = 1.0, soft_mode: str = "soft", tau: float = 1.0,
                          r_init: float = 0.5, sigma_init: float = 0.3, aesthetic_score: float = 6.5,
                          micro_conds=DIMO_MICRO_CONDS, grid=None, mesh=None) -> Callable:
    """-> fn(gen_params, decoder_params, reward_params, rng, conditions) -> dict: ids (B, L) or
    (B, H, W), images (B, H, W, 3) in [0, 1] (the decoder's decode of the ids), reward_init (B,)
    (soft reward at the plain sampler's embedding), reward_final (B,) (soft reward of the kept
    embedding); `fn.cost` gives the passes per image. `generator`: a MaskGen (decoder TA-TiTok;
    `aesthetic_score`) or Meissonic (decoder its VQ model; `grid`, `micro_conds`) student.
    Conditions are batch-sharded over `mesh` (default: all devices)."""
    check_tteo_settings(best_of, select, temperature)
    check_decoder_fits(generator, decoder)
    initial, logits_of, hard_images = one_step_family(
        generator, decoder, r_init=r_init, sigma_init=sigma_init, aesthetic_score=aesthetic_score,
        micro_conds=micro_conds, grid=grid)
    embedder = SoftEmbedder(mode=soft_mode, tau=tau)
    mesh = meshlib.as_auto_mesh(mesh if mesh is not None else meshlib.make_mesh())

    def soft_reward(gp, tp, rp, e, conds, k_soft):
        z = logits_of(gp, e, conds)
        k = k_soft if soft_mode.startswith("gumbel") else None
        images = soft_decode_t2i(decoder, tp, embedder, z, conds, k)
        total, _ = reward_set.total(rp, images, conds)
        return total, z

    def fn(gp, tp, rp, rng, conds):
        b = conds["condition"].shape[0]
        k_soft = jax.random.fold_in(rng, 0x7E0)
        keys = [rng] + [jax.random.fold_in(rng, n) for n in range(1, best_of)]
        draws = [initial(gp, k, b) for k in keys]
        e0 = jnp.concatenate([d[0] for d in draws])  # (N·B, L, d) or (N·B, H, W, C)
        k_samp = draws[0][1]
        conds_n = jax.tree.map(lambda x: jnp.concatenate([x] * best_of), conds)
        objective = lambda e: soft_reward(gp, tp, rp, e, conds_n, k_soft)[0]
        e_k, trace = optimise_embeddings(objective, e0, steps, lr)
        r_final, z_all = soft_reward(gp, tp, rp, e_k, conds_n, k_soft)
        if best_of > 1:
            score = r_final
            if select == "reward_confidence":
                conf = jnp.max(jax.nn.softmax(z_all, -1), -1)
                score = score + confidence_weight * jnp.mean(conf, axis=tuple(range(1, conf.ndim)))
            best = jnp.argmax(score.reshape(best_of, b), axis=0)
            pick = lambda x: jnp.take_along_axis(
                x.reshape(best_of, b, *x.shape[1:]), best.reshape(1, b, *([1] * (x.ndim - 1))), 0)[0]
            z, r_kept = pick(z_all), pick(r_final)
        else:
            z, r_kept = z_all, r_final
        if temperature == 0:
            ids = jnp.argmax(z, axis=-1)
        else:
            ids = jax.random.categorical(k_samp, z / temperature, axis=-1)
        ids = ids.astype(jnp.int32)
        images = hard_images(tp, ids, conds)
        return {
            "ids": ids,
            "images": jnp.clip(images, 0.0, 1.0),
            "reward_init": trace[0, :b] if steps > 0 else r_final[:b],
            "reward_final": r_kept,
        }

    jitted = jax.jit(fn)

    def sample(gen_params, decoder_params, reward_params, rng, conditions):
        b = conditions["condition"].shape[0]
        meshlib.check_batch_divisible(b, mesh)
        conditions = jax.tree.map(
            lambda x: jax.device_put(jnp.asarray(x), meshlib.batch_sharding(mesh, jnp.ndim(x))), conditions)
        return jitted(gen_params, decoder_params, reward_params, rng, conditions)

    sample.cost = tteo_cost(steps, best_of)
    return sample
