"""MaskGIT samplers: the multi-step teacher decoding as Di[M]O evaluates its MaskGIT teacher
(`val_sample` + `adap_sche` + `cfg_pred_model` in Di[M]O's MaskGIT training script), and the
one-step Di[M]O student (`generate_one_step`). Both are jitted (`lax.fori_loop` for the
teacher) with params passed explicitly.

Teacher, with n = num_steps and counts = `reveal_counts(L, n, schedule)` (tokens revealed
per step, summing to L):

  tokens = all MASK
  for i in 0 .. n-1, ratio = i / (n − 1):
    1. logits: conditional c and label-dropped u from one forward over the doubled batch,
       guided as u + g·(c − u) with g = 1 + w·ratio (computed as c + (g − 1)(c − u), so
       w = 0 gives the conditional logits exactly; Di[M]O then runs the conditional
       forward alone, and so do we when w is 0 at build time).
    2. p = softmax(logits · sm_temp) over the K + 1 classes (visual tokens and MASK, as the
       original); x ~ Cat(p) at every position.
    3. confidence = log p(x) + r_temp · Gumbel · (1 − ratio) ("linear" randomisation; also
       "warm_up", "random", "none"); positions already revealed get −inf.
    4. the t_i = min(counts[i], #masked) most confident masked positions take x.
  The result is clamped to [0, K − 1] as the original does before decoding (a sampled MASK
  id, possible only where the teacher gives MASK real mass, becomes K − 1); with
  sample_mask_token=False the MASK logit is dropped from step 2 instead.

Deliberate differences from the PyTorch code: exactly t_i positions are revealed (rank
based; the original may reveal more on exact ties of the noisy confidence); randomness comes
from fold_in(rng, step); for num_steps = 1 (undefined in the original: 0/0) ratio = 1.

The model is reached through a pure closure
    logits_fn(tokens (B, L) int32, labels (B,) int32, drop_label (B,) bool) -> (B, L, K + 1)
so the sampler needs nothing else from the module.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.models.maskgit import perturb_embeddings

LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

SCHEDULES = ("arccos", "cosine", "linear", "square", "root")
RANDOMIZE = ("linear", "warm_up", "random", "none")

# Di[M]O's evaluation of its MaskGIT teacher (train_MaskGit defaults: sampling_step 12,
# cfg_w 3, r_temp 4.5, sm_temp 1, arccos, linear Gumbel randomisation).
DIMO_TEACHER_DEFAULTS: dict[str, Any] = dict(
    num_steps=12,
    cfg_scale=3.0,
    r_temp=4.5,
    sm_temp=1.0,
    schedule="arccos",
    randomize="linear",
    sample_mask_token=True,
)
# Di[M]O's one-step MaskGIT student (sample_MaskGit defaults: fixed_ratio 0.6, σ 0.1).
DIMO_STUDENT_DEFAULTS: dict[str, Any] = dict(r_init=0.6, sigma=0.1, gen_temp=1.0)


def reveal_counts(num_tokens: int, num_steps: int, schedule: str = "arccos") -> np.ndarray:
    """(num_steps,) int32: tokens revealed at each step (MaskGIT's `adap_sche`), sum = L.

    r = linspace(1, 0, n); v = schedule(r) (arccos: arccos(r)/(π/2)); counts =
    round(v / Σv · L), zeros raised to 1, the last entry absorbing the remainder.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps > num_tokens:
        raise ValueError(f"num_steps={num_steps} exceeds the {num_tokens} tokens (each step reveals >= 1)")
    if num_steps == 1:
        return np.array([num_tokens], np.int32)  # the original's formula is 0/0 here
    r = np.linspace(1.0, 0.0, num_steps).astype(np.float32)
    if schedule == "root":
        v = 1 - np.sqrt(r)
    elif schedule == "linear":
        v = 1 - r
    elif schedule == "square":
        v = 1 - r**2
    elif schedule == "cosine":
        v = np.cos(r * np.float32(math.pi * 0.5))
    elif schedule == "arccos":
        v = np.arccos(r) / np.float32(math.pi * 0.5)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    v = v.astype(np.float32)
    counts = np.round(v / v.sum() * np.float32(num_tokens))  # half-to-even, like torch.round
    counts[counts == 0] = 1
    counts[-1] += num_tokens - counts.sum()
    if counts[-1] < 1:
        raise ValueError(
            f"schedule {schedule!r} with {num_steps} steps cannot reveal {num_tokens} tokens "
            "(>= 1 per step); use fewer steps"
        )
    return counts.astype(np.int32)


def step_ratios(num_steps: int) -> np.ndarray:
    """(num_steps,) float32 i / (n − 1), the progress Di[M]O uses for CFG and Gumbel noise
    (1 for a single step, where the original divides by zero)."""
    if num_steps == 1:
        return np.ones(1, np.float32)
    return np.arange(num_steps, dtype=np.float32) / np.float32(num_steps - 1)


def guidance_scales(num_steps: int, cfg_scale):
    """(num_steps,) g_i = 1 + w · i / (n − 1): Di[M]O's linearly ramped CFG scale (w may be
    a traced value)."""
    return 1.0 + jnp.asarray(cfg_scale, jnp.float32) * jnp.asarray(step_ratios(num_steps))


def guided_logits(cond, uncond, scale):
    """u + g·(c − u), written c + (g − 1)(c − u) so that g = 1 returns c exactly."""
    return cond + (scale - 1.0) * (cond - uncond)


def _cfg_forward(logits_fn: LogitsFn, tokens, labels, scale):
    # Interleaved (cond, uncond) pairs: per-sample results equal the original's
    # [cond; uncond] concatenation and a batch-sharded input stays on its device.
    b = tokens.shape[0]
    logits = logits_fn(jnp.repeat(tokens, 2, axis=0), jnp.repeat(labels, 2, axis=0),
                       jnp.tile(jnp.array([False, True]), b)).astype(jnp.float32)
    logits = logits.reshape(b, 2, *logits.shape[1:])
    return guided_logits(logits[:, 0], logits[:, 1], scale)


def maskgit_sample(
    logits_fn: LogitsFn,
    rng: jax.Array,
    labels: jax.Array,
    *,
    num_tokens: int,
    codebook_size: int,
    num_steps: int = 12,
    cfg_scale: float = 3.0,
    r_temp: float = 4.5,
    sm_temp: float = 1.0,
    schedule: str = "arccos",
    randomize: str = "linear",
    sample_mask_token: bool = True,
    return_intermediates: bool = False,
):
    """MaskGIT multi-step decoding from `logits_fn` (see the module docstring); traceable.

    Args:
      logits_fn: (tokens (B, L), labels (B,), drop_label (B,)) -> logits (B, L, K + 1).
      rng: PRNG key. labels: (B,) class ids.
      num_tokens, codebook_size: L and K (MASK = K).
      cfg_scale: w of g_i = 1 + w·i/(n − 1) (may be traced); a Python 0 skips the
        unconditional forward.
      return_intermediates: also return {"tokens": (n, B, L) the state after each step
        (MASK = K where still masked, unclamped), "num_masked": (n, B)}.

    Returns:
      (B, L) int32 ids in [0, K), or (ids, intermediates).
    """
    if randomize not in RANDOMIZE:
        raise ValueError(f"unknown randomize {randomize!r}; choose one of {RANDOMIZE}")
    if sm_temp <= 0:
        raise ValueError(f"sm_temp multiplies the logits and must be > 0, got {sm_temp}")
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a (B,) vector of class ids, got shape {labels.shape}")
    b, mask_id = labels.shape[0], codebook_size
    counts = jnp.asarray(reveal_counts(num_tokens, num_steps, schedule))
    ratios = jnp.asarray(step_ratios(num_steps))
    scales = guidance_scales(num_steps, cfg_scale)
    use_cfg = not (isinstance(cfg_scale, (int, float)) and cfg_scale == 0)

    def step(i, carry):
        tokens, masked = carry[0], carry[1]
        ratio = ratios[i]
        if use_cfg:
            logits = _cfg_forward(logits_fn, tokens, labels, scales[i])
        else:
            logits = logits_fn(tokens, labels, jnp.zeros((b,), bool)).astype(jnp.float32)
        if logits.shape != (b, num_tokens, codebook_size + 1):
            raise ValueError(
                f"logits_fn returned {logits.shape}; expected (B, L, K + 1) = {(b, num_tokens, codebook_size + 1)}"
            )
        z = logits * sm_temp
        if not sample_mask_token:
            z = z.at[..., mask_id].set(-jnp.inf)
        log_p = jax.nn.log_softmax(z, axis=-1)
        k_sample, k_noise = jax.random.split(jax.random.fold_in(rng, i))
        pred = jax.random.categorical(k_sample, z, axis=-1).astype(jnp.int32)
        conf = jnp.take_along_axis(log_p, pred[..., None], axis=-1)[..., 0]
        if randomize == "linear":
            conf = conf + r_temp * jax.random.gumbel(k_noise, conf.shape) * (1.0 - ratio)
        elif randomize == "random" or randomize == "warm_up":
            rand = jax.random.uniform(k_noise, conf.shape)
            conf = rand if randomize == "random" else jnp.where(i < 2, rand, conf)
        conf = jnp.where(masked, conf, -jnp.inf)

        # Reveal exactly t of the most confident still-masked positions.
        t = jnp.minimum(counts[i], jnp.sum(masked, axis=-1))
        rank = jnp.argsort(jnp.argsort(-conf, axis=-1, stable=True), axis=-1, stable=True)
        reveal = (rank < t[:, None]) & masked
        tokens = jnp.where(reveal, pred, tokens)
        masked = masked & ~reveal
        out = (tokens, masked)
        if return_intermediates:
            out += (carry[2].at[i].set(tokens), carry[3].at[i].set(jnp.sum(masked, axis=-1)))
        return out

    init = (jnp.full((b, num_tokens), mask_id, jnp.int32), jnp.ones((b, num_tokens), bool))
    if return_intermediates:
        init += (jnp.zeros((num_steps, b, num_tokens), jnp.int32), jnp.zeros((num_steps, b), jnp.int32))
    final = lax.fori_loop(0, num_steps, step, init)
    ids = jnp.clip(final[0], 0, codebook_size - 1)  # as the original before decode_code
    if return_intermediates:
        return ids, {"tokens": final[2], "num_masked": final[3]}
    return ids


def maskgit_logits_fn(model, params, *, deterministic: bool = True) -> LogitsFn:
    """The logits closure of a MaskGITTransformer (dropout off)."""

    def logits_fn(tokens, labels, drop_label):
        return model.apply({"params": params}, tokens, labels, drop_label=drop_label, deterministic=deterministic)

    return logits_fn


def _jit_batch_sharded(run, mesh, params_sharding, out_ndim: int):
    if mesh is None:
        jitted = jax.jit(run)
    else:
        jitted = jax.jit(
            run,
            in_shardings=(
                meshlib.replicated(mesh) if params_sharding is None else params_sharding,
                meshlib.replicated(mesh),
                meshlib.batch_sharding(mesh, 1),
            ),
            out_shardings=meshlib.batch_sharding(mesh, out_ndim),
        )

    @functools.wraps(run)
    def sampler(params, rng, labels):
        labels = jnp.asarray(labels, jnp.int32)
        if mesh is not None:
            meshlib.check_batch_divisible(labels.shape[0], mesh)
        return jitted(params, rng, labels)

    sampler.jitted = jitted
    return sampler


def _check_model(model):
    for field in ("num_tokens", "codebook_size", "grid_size"):
        if not hasattr(model, field):
            raise TypeError(f"{type(model).__name__} has no `{field}`; expected a MaskGITTransformer")


def make_maskgit_teacher_sampler(model, *, mesh=None, params_sharding=None, **sample_kwargs):
    """Jitted fn(params, rng, labels) -> (B, h, w) token ids from a MaskGITTransformer teacher.

    Settings default to Di[M]O's teacher evaluation (DIMO_TEACHER_DEFAULTS), overridable by
    keyword (num_steps, cfg_scale, r_temp, sm_temp, schedule, randomize, sample_mask_token).
    With `mesh`, labels and outputs are batch-sharded (batch a multiple of the mesh size).
    """
    _check_model(model)
    settings = {**DIMO_TEACHER_DEFAULTS, **sample_kwargs}
    settings.pop("return_intermediates", None)
    g = model.grid_size

    def run(params, rng, labels):
        ids = maskgit_sample(maskgit_logits_fn(model, params), rng, labels, num_tokens=model.num_tokens,
                             codebook_size=model.codebook_size, **settings)
        return ids.reshape(ids.shape[0], g, g)

    return _jit_batch_sharded(run, mesh, params_sharding, 3)


def initial_tokens(rng, batch: int, num_tokens: int, codebook_size: int, r_init: float):
    """Di[M]O's initial state: (B, L) ids uniform over [0, K) with exactly
    max(1, round(r_init·L)) positions per sample set to MASK (= K)."""
    k_tok, k_pos = jax.random.split(rng)
    tokens = jax.random.randint(k_tok, (batch, num_tokens), 0, codebook_size, jnp.int32)
    num_masked = max(1, int(np.round(np.float32(num_tokens * r_init))))
    # argsort of uniform noise is a random permutation: exactly num_masked entries < num_masked.
    perm = jnp.argsort(jax.random.uniform(k_pos, (batch, num_tokens)), axis=-1)
    return jnp.where(perm < num_masked, codebook_size, tokens)


def one_step_sample(model, params, rng, labels, *, r_init: float = 0.6, sigma: float = 0.1,
                    gen_temp: float = 1.0, return_logits: bool = False):
    """Di[M]O's one-step student (`generate_one_step`); traceable.

    Tokens uniform over [0, K); exactly max(1, round(r_init·L)) positions per sample (argsort
    of uniform noise) set to MASK; visual embeddings perturbed e <- σ·ε + sqrt(1 − σ²)·e;
    one forward (conditional, dropout off); x ~ Cat(softmax(logits / gen_temp)) over K + 1
    classes, clamped to [0, K − 1] as the original before decoding.
    Returns (B, L) ids (and the (B, L, K + 1) logits with return_logits).
    """
    if not 0.0 <= r_init <= 1.0:
        raise ValueError(f"r_init is a mask ratio in [0, 1], got {r_init}")
    if gen_temp <= 0:
        raise ValueError(f"gen_temp must be > 0, got {gen_temp}")
    labels = jnp.asarray(labels, jnp.int32)
    k_init, k_noise, k_sample = jax.random.split(rng, 3)
    tokens = initial_tokens(k_init, labels.shape[0], model.num_tokens, model.codebook_size, r_init)
    k = model.codebook_size
    v = {"params": params}
    emb = model.apply(v, tokens, method=type(model).embed_tokens)
    emb = perturb_embeddings(emb, sigma, k_noise)
    logits = model.apply(v, None, labels, input_embeddings=emb, deterministic=True)
    ids = jax.random.categorical(k_sample, logits / gen_temp, axis=-1).astype(jnp.int32)
    ids = jnp.clip(ids, 0, k - 1)
    return (ids, logits) if return_logits else ids


def make_maskgit_student_sampler(model, *, mesh=None, params_sharding=None, **kwargs):
    """Jitted fn(params, rng, labels) -> (B, h, w) ids from the one-step Di[M]O generator
    (settings: DIMO_STUDENT_DEFAULTS, overridable by keyword: r_init, sigma, gen_temp)."""
    _check_model(model)
    settings = {**DIMO_STUDENT_DEFAULTS, **kwargs}
    g = model.grid_size

    def run(params, rng, labels):
        ids = one_step_sample(model, params, rng, labels, **settings)
        return ids.reshape(ids.shape[0], g, g)

    return _jit_batch_sharded(run, mesh, params_sharding, 3)
