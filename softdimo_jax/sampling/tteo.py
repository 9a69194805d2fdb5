"""Test-time embedding optimisation (TTEO, SPEC §1.5) for the one-step generator of any
class-conditional family (the adapter and soft decode come from `sampling.api`).

Weights stay frozen. The generator's input embedding e (the σ-perturbed embedding of the
random, partly masked initial tokens — exactly what `sampling/student.py` feeds it) is
optimised for K plain SGD steps (default 2, lr 0.2, no clipping) to maximise a reward of
the SOFT decode:

    e ← e + lr · ∇_e Σ_b R(Dec(E_softmax(G(e, c)/τ)[bits]), c)_b

then the sample is taken from G(e_K, c) exactly as the plain sampler does (hard tokens at
the sampler's temperature, or the soft bits). With K = 0 and N = 1 this IS the plain
one-step sampler (same rng use), which the tests check.

Best-of-N: N ≤ 16 initial embeddings per image (candidate 0 is the plain sampler's), each
optimised, scored by a selection score ('reward', or 'reward_confidence' = reward +
weight · mean max-probability of G's output), the best one kept.

Cost per image, in passes through generator + soft decoder + reward:
forward = N·(K + 1), backward = N·K (the plain sampler: one generator forward). The last
forward scores the candidates, reports the reward and gives the logits of the sample.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from softdimo_jax.models.soft_embed import SoftEmbedder
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.converted import family_of
from softdimo_jax.sampling import api
from softdimo_jax.sampling.student import initial_embeddings

MAX_BEST_OF = 16
SELECT = ("reward", "reward_confidence")


def tteo_cost(steps: int, best_of: int) -> dict:
    """Passes per image through generator (+ soft decode + reward) relative to plain sampling."""
    fwd = best_of * (steps + 1)
    bwd = best_of * steps
    # A backward costs about two forwards; the plain sampler is one generator forward.
    return {"forward": fwd, "backward": bwd, "plain_forward": 1, "relative": fwd + 2 * bwd}


def optimise_embeddings(objective: Callable, e, steps: int, lr: float):
    """K steps of plain SGD ascent on Σ objective(e) (objective: e -> (B,) rewards).
    Images are independent, so the batch sum gives each image its own gradient.
    -> (e_K, rewards at e_0 .. e_{K-1} (K, B))."""
    if steps < 0:
        raise ValueError(f"TTEO steps must be >= 0, got {steps}")
    if steps == 0:
        return e, jnp.zeros((0, e.shape[0]), jnp.float32)

    def step(e, _):
        vals, grad = jax.vjp(objective, e)
        (g,) = grad(jnp.ones_like(vals))
        g = jnp.where(jnp.isfinite(g), g, 0.0)
        return e + lr * g.astype(e.dtype), vals

    return jax.lax.scan(step, e, None, length=steps)


def check_tteo_settings(best_of: int, select: str, temperature: float) -> None:
    """The settings every TTEO sampler shares, refused before anything compiles."""
    if not 1 <= best_of <= MAX_BEST_OF:
        raise ValueError(f"best_of must be in [1, {MAX_BEST_OF}], got {best_of}")
    if select not in SELECT:
        raise ValueError(f"unknown TTEO selection score {select!r}; choose one of {SELECT}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = argmax), got {temperature}")


def make_tteo_sampler(model, tokenizer, reward_set, *, grid, steps: int = 2, lr: float = 0.2,
                      best_of: int = 1, select: str = "reward", confidence_weight: float = 1.0,
                      output: str = "hard", temperature: float = 1.0, soft_mode: str = "soft",
                      tau: float = 1.0, r_init: float = 0.6, sigma_init: float = 0.1,
                      init_mask_mode: str = "position", mesh=None, dtype=None) -> Callable:
    """-> fn(gen_params, tokenizer_params, reward_params, rng, labels) -> dict:
    tokens (B, L, S) or bits (B, L, bits) (as the student sampler), reward_init (B,) (soft
    reward at the plain sampler's embedding), reward_final (B,) (soft reward of the kept
    embedding), and `cost` (Python dict, per image) on the function itself (`fn.cost`).
    Jitted; labels batch-sharded over `mesh` (default: all devices)."""
    if output not in ("hard", "soft"):
        raise ValueError(f"TTEO output must be 'hard' or 'soft', got {output!r}")
    check_tteo_settings(best_of, select, temperature)
    # The family's one-step adapter and soft decode (sampling.api), as `sample` uses them.
    spec = api.family_sampling(family_of(model))
    if spec.conditioning != "class":
        raise NotImplementedError("this TTEO takes class-conditional generators; text-to-image TTEO is "
                                  "softdimo_jax.sampling.t2i_tteo.make_t2i_tteo_sampler")
    adapter = spec.adapter(model, dtype, {})
    embedder = SoftEmbedder(mode=soft_mode, tau=tau)
    # The soft decode the reward sees is deterministic ('soft' expectation) unless the
    # relaxation itself is stochastic; Gumbel modes get a fixed key per call.
    mesh = meshlib.as_auto_mesh(mesh if mesh is not None else meshlib.make_mesh())
    grid = tuple(grid)
    if grid[0] * grid[1] != adapter.num_tokens or grid[0] != grid[1]:
        raise ValueError(f"token grid {grid} is not the generator's square grid of {adapter.num_tokens} tokens")

    def soft_reward(gp, tp, rp, e, labels, k_soft):
        z = adapter.student_logits(gp, labels, embeddings=e)
        images = spec.decode_soft(tokenizer, tp, z, labels, model, embedder,
                                  k_soft if soft_mode.startswith("gumbel") else None)
        total, _ = reward_set.total(rp, images, labels)
        return total, z

    def fn(gp, tp, rp, rng, labels):
        k_in, k_out = jax.random.split(rng)
        k_soft = jax.random.fold_in(rng, 0x7E0)
        b = labels.shape[0]
        keys = [k_in] + [jax.random.fold_in(k_in, n) for n in range(1, best_of)]
        e0 = jnp.concatenate([
            initial_embeddings(adapter, gp, k, labels, r_init=r_init, sigma_init=sigma_init,
                               init_mask_mode=init_mask_mode) for k in keys])  # (N·B, L, d)
        labels_n = jnp.tile(labels, best_of)
        objective = lambda e: soft_reward(gp, tp, rp, e, labels_n, k_soft)[0]
        e_k, trace = optimise_embeddings(objective, e0, steps, lr)

        # One forward of generator + soft decode + reward on the kept embeddings gives the
        # selection score, the reported reward and the logits the sample is drawn from.
        r_final, z_all = soft_reward(gp, tp, rp, e_k, labels_n, k_soft)
        if best_of > 1:
            score = r_final
            if select == "reward_confidence":
                conf = jnp.mean(jnp.max(jax.nn.softmax(z_all, -1), -1), axis=(1, 2))
                score = score + confidence_weight * conf
            best = jnp.argmax(score.reshape(best_of, b), axis=0)  # (B,)
            pick = lambda x: jnp.take_along_axis(
                x.reshape(best_of, b, *x.shape[1:]), best.reshape(1, b, *([1] * (x.ndim - 1))), 0)[0]
            z, r_kept = pick(z_all), pick(r_final)
        else:
            z, r_kept = z_all, r_final

        out = {}
        if output == "soft":  # MaskBit: expected bits; token-codebook families: code probabilities
            key = k_out if soft_mode.startswith("gumbel") else None
            out.update(spec.soft_output(embedder, z, key))
        elif temperature == 0:
            out["tokens"] = jnp.argmax(z, axis=-1).astype(jnp.int32)
        else:
            out["tokens"] = jax.random.categorical(k_out, z / temperature, axis=-1).astype(jnp.int32)
        out["reward_init"] = trace[0, :b] if steps > 0 else r_final[:b]
        out["reward_final"] = r_kept
        return out

    jitted = jax.jit(fn, in_shardings=(None, None, None, meshlib.replicated(mesh),
                                       meshlib.batch_sharding(mesh, 1)))

    def sample(gen_params, tokenizer_params, reward_params, rng, labels):
        labels = jnp.asarray(labels, jnp.int32)
        meshlib.check_batch_divisible(labels.shape[0], mesh)
        return jitted(gen_params, tokenizer_params, reward_params, rng, labels)

    sample.cost = tteo_cost(steps, best_of)
    return sample


def tteo_sampler_from_config(model, tokenizer, reward_set, distill_config, tteo_config, grid,
                             mesh=None) -> Callable:
    d, t = distill_config, tteo_config
    return make_tteo_sampler(
        model, tokenizer, reward_set, grid=grid, steps=int(t.steps), lr=float(t.lr),
        best_of=int(t.best_of), select=str(t.select), confidence_weight=float(t.confidence_weight),
        output=str(t.output), temperature=float(d.sample.temperature), soft_mode=str(t.soft_mode),
        tau=float(t.soft_tau), r_init=float(d.r_init), sigma_init=float(d.sigma_init),
        init_mask_mode=str(d.init_mask_mode), mesh=mesh, dtype=d.compute_dtype,
    )
