"""MaskBit's multi-step parallel decoding (the teacher sampler), jitted with `lax.fori_loop`.

The algorithm follows MaskBit's released `sample` (modeling/modules/sampling.py) step for step:

  for i in 0 .. num_steps-1, progress = (i+1)/num_steps:
    1. logits: one forward over the doubled batch (conditional, label-dropped) and
       CFG  z = c + s·a(i)·(c − u), with a(i) = (1 − cos(π·(i/num_steps)^scale_pow))/2
       ("cosine" = power-cos annealing; "linear": a = i/num_steps; "none": a = 1).
       With guidance_scale == 0 only the conditional forward runs.
    2. p = softmax(z / T), T = softmax_temperature (or 0.5 + 0.8·(1 − progress) with
       use_sampling_annealing); every still-masked sub-token draws x ~ Cat(p); fixed
       sub-tokens keep their value.
    3. confidence = log p(x) + Gumbel · randomize_temperature · (1 − progress); fixed
       sub-tokens get +inf, so they are never re-masked.
    4. k = clamp(floor(r(progress)·L·S), 1, n_masked − 1) sub-tokens with the lowest confidence
       go back to MASK (r = the mask schedule, arccos by default, clamped to [1e-6, 1]).
  The result is the prediction of the last step (every sub-token filled, no MASK).

Each of the S splits of a token is its own maskable unit (per-split masking): the ranking
in step 4 runs over all L·S sub-tokens of a sample.

Deliberate differences from the PyTorch code (none changes results in practice):
  * step 4 keeps exactly the k lowest-confidence sub-tokens masked (rank-based), where
    MaskBit re-masks every sub-token with confidence <= the k-th smallest; the two differ only
    on exact ties of the noisy confidence.
  * when only one sub-token is left masked before the last step, MaskBit's clamp yields 0 and
    its threshold index wraps to -1 (re-masking everything); we fix 0 sub-tokens masked, i.e.
    fill them all, which is the evident intent. This never happens with the released settings.
  * log p(x) comes from log_softmax (no log(0) = −inf for underflowing probabilities).
  * randomness comes from `fold_in(rng, step)`, so it is the same on any number of devices.

The model is reached only through a pure closure
    logits_fn(tokens (B, L, S) int32, labels (B,) int32, drop_label_mask (B,) bool) -> (B, L, S, V)
(`drop_label_mask` True = use the class-drop label), so the sampler serves any teacher
with per-split sub-token logits (S = 1 for plain MaskGIT-style teachers).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from softdimo_jax.runtime import mesh as meshlib

LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

MASK_SCHEDULES = ("arccos", "cosine", "linear", "square", "root")
GUIDANCE_ANNEALINGS = ("none", "linear", "cosine")

# MaskBit's released ImageNet-256 generator settings (configs/generator/maskbit_generator_*bit.yaml
# and scripts/eval_maskbit.py): 64 steps, CFG 7.1 with power-cos annealing (pow 3), Gumbel
# confidence noise 7.8, softmax temperature 1.0, arccos schedule, no temperature annealing.
IMAGENET_DEFAULTS: dict[str, Any] = dict(
    num_steps=64,
    guidance_scale=7.1,
    guidance_annealing="cosine",
    scale_pow=3.0,
    randomize_temperature=7.8,
    softmax_temperature=1.0,
    use_sampling_annealing=False,
    mask_schedule="arccos",
)


def mask_ratio(progress, mode: str = "arccos"):
    """Fraction of sub-tokens still masked after `progress` ∈ (0, 1] of the steps (float32)."""
    r = np.float32(progress)
    if mode == "arccos":
        val = np.arccos(r) / np.float32(math.pi * 0.5)
    elif mode == "cosine":
        val = np.cos(r * np.float32(math.pi * 0.5))
    elif mode == "linear":
        val = 1 - r
    elif mode == "square":
        val = 1 - r**2
    elif mode == "root":
        val = 1 - np.sqrt(r)
    else:
        raise ValueError(f"unknown mask schedule {mode!r}; choose one of {MASK_SCHEDULES}")
    return np.clip(np.float32(val), np.float32(1e-6), np.float32(1.0))


def masked_counts(num_steps: int, num_maskable: int, mode: str = "arccos") -> np.ndarray:
    """(num_steps,) int: how many sub-tokens are still MASK after each step.

    Step i keeps clamp(floor(r((i+1)/num_steps)·N), 1, n_i − 1) masked (n_i = masked before it,
    n_0 = N); the last step fills everything (0).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    counts = np.zeros(num_steps, np.int32)
    n = num_maskable
    for i in range(num_steps - 1):
        want = int(np.floor(mask_ratio((i + 1) / num_steps, mode) * np.float32(num_maskable)))
        n = max(0, min(max(want, 1), n - 1))
        counts[i] = n
    return counts


def guidance_schedule(num_steps: int, annealing: str = "cosine", scale_pow: float = 3.0) -> np.ndarray:
    """(num_steps,) float32 a(i), the factor of guidance_scale at step i."""
    t = np.arange(num_steps, dtype=np.float32) / np.float32(num_steps)
    if annealing == "none":
        a = np.ones_like(t)
    elif annealing == "linear":
        a = t
    elif annealing == "cosine":  # MaskBit's power-cos annealing
        a = (1 - np.cos(t ** np.float32(scale_pow) * np.float32(math.pi))) * np.float32(0.5)
    else:
        raise ValueError(f"unknown guidance_annealing {annealing!r}; choose one of {GUIDANCE_ANNEALINGS}")
    return a.astype(np.float32)


def cfg_logits(cond, uncond, scale):
    """MaskBit's guidance c + s·(c − u) (s already includes the annealing factor)."""
    return cond + scale * (cond - uncond)


def _cfg_forward(logits_fn: LogitsFn, tokens, labels, scale):
    """Conditional and label-dropped logits from one forward over the doubled batch, combined.

    The doubled batch interleaves (cond, uncond) per sample, (B, 2, ...) -> (2B, ...), rather
    than concatenating [cond; uncond]: the per-sample result is the same and a batch-sharded
    input stays local to its device.
    """
    b = tokens.shape[0]
    both_tokens = jnp.repeat(tokens, 2, axis=0)
    both_labels = jnp.repeat(labels, 2, axis=0)
    drop = jnp.tile(jnp.array([False, True]), b)
    logits = logits_fn(both_tokens, both_labels, drop).astype(jnp.float32)
    logits = logits.reshape(b, 2, *logits.shape[1:])
    return cfg_logits(logits[:, 0], logits[:, 1], scale)


def _check_logits(logits, tokens, vocab_size):
    want = (*tokens.shape, vocab_size)
    if logits.shape != want:
        raise ValueError(
            f"logits_fn returned shape {logits.shape}; expected (B, L, S, V) = {want}. "
            "Check num_tokens, splits and vocab_size against the model."
        )


def maskbit_sample(
    logits_fn: LogitsFn,
    rng: jax.Array,
    labels: jax.Array,
    *,
    num_tokens: int,
    splits: int,
    vocab_size: int,
    num_steps: int = 64,
    guidance_scale: float = 7.1,
    guidance_annealing: str = "cosine",
    scale_pow: float = 3.0,
    randomize_temperature: float = 7.8,
    softmax_temperature: float = 1.0,
    use_sampling_annealing: bool = False,
    mask_schedule: str = "arccos",
    return_intermediates: bool = False,
):
    """MaskBit multi-step sampling from `logits_fn`; traceable (call under jit).

    Args:
      logits_fn: (tokens (B,L,S), labels (B,), drop_label_mask (B,)) -> logits (B,L,S,V).
      rng: PRNG key.
      labels: (B,) int class labels.
      num_tokens, splits, vocab_size: L, S and V; MASK is the sub-token id V.
      The rest: see the module docstring; defaults = MaskBit's released ImageNet settings.
      return_intermediates: also return {"predicted": (num_steps,B,L,S) the full prediction of
        each step (MaskBit's per-step list), "tokens": (num_steps,B,L,S) the state after
        re-masking (MASK = V; all filled after the last step)}.

    Returns:
      (B, L, S) int32 sub-token ids in [0, V), or (tokens, intermediates).
    """
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a (B,) vector of class ids, got shape {labels.shape}")
    if softmax_temperature <= 0 and not use_sampling_annealing:
        raise ValueError(f"softmax_temperature must be > 0, got {softmax_temperature}")
    b = labels.shape[0]
    num_maskable = num_tokens * splits
    counts = jnp.asarray(masked_counts(num_steps, num_maskable, mask_schedule))
    scales = jnp.asarray(np.float32(guidance_scale) * guidance_schedule(num_steps, guidance_annealing, scale_pow))
    mask_id = vocab_size
    use_cfg = guidance_scale != 0.0  # static: MaskBit skips the unconditional forward at scale 0

    def step(i, carry):
        tokens = carry[0]
        progress = (i + 1).astype(jnp.float32) / num_steps
        if use_cfg:
            logits = _cfg_forward(logits_fn, tokens, labels, scales[i])
        else:
            logits = logits_fn(tokens, labels, jnp.zeros((b,), bool)).astype(jnp.float32)
        _check_logits(logits, tokens, vocab_size)

        temperature = (0.5 + 0.8 * (1.0 - progress)) if use_sampling_annealing else softmax_temperature
        log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
        key_sample, key_noise = jax.random.split(jax.random.fold_in(rng, i))
        sampled = jax.random.categorical(key_sample, log_probs, axis=-1).astype(jnp.int32)

        is_masked = tokens == mask_id
        predicted = jnp.where(is_masked, sampled, tokens)
        log_conf = jnp.take_along_axis(log_probs, predicted[..., None], axis=-1)[..., 0]
        noise = jax.random.gumbel(key_noise, predicted.shape, jnp.float32)
        confidence = jnp.where(is_masked, log_conf + noise * (randomize_temperature * (1.0 - progress)), jnp.inf)

        # Keep exactly counts[i] of the least confident sub-tokens masked (fixed ones rank last).
        flat = confidence.reshape(b, num_maskable)
        rank = jnp.argsort(jnp.argsort(flat, axis=-1, stable=True), axis=-1, stable=True)
        remask = (rank < counts[i]).reshape(predicted.shape)
        new_tokens = jnp.where(remask, mask_id, predicted)

        out = (new_tokens, predicted)
        if return_intermediates:
            out += (carry[2].at[i].set(predicted), carry[3].at[i].set(new_tokens))
        return out

    shape = (b, num_tokens, splits)
    init = (jnp.full(shape, mask_id, jnp.int32), jnp.zeros(shape, jnp.int32))
    if return_intermediates:
        init += (jnp.zeros((num_steps, *shape), jnp.int32), jnp.zeros((num_steps, *shape), jnp.int32))
    final = lax.fori_loop(0, num_steps, step, init)
    if return_intermediates:
        return final[1], {"predicted": final[2], "tokens": final[3]}
    return final[1]


def _untyped(x, auto_meshes: dict):
    """Re-places an array sharded over an Explicit-axes mesh onto its Auto twin (same layout).

    Explicit shardings become part of array types and make model code (reshapes, repeats
    over the batch) raise sharding-type errors; the sampler lets the compiler propagate
    shardings instead.
    """
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding) or all(t == AxisType.Auto for t in sharding.mesh.axis_types):
        return x
    key = id(sharding.mesh)
    if key not in auto_meshes:
        auto_meshes[key] = meshlib.as_auto_mesh(sharding.mesh)
    return jax.device_put(x, NamedSharding(auto_meshes[key], sharding.spec))


def _auto_sharding(s, amesh):
    return NamedSharding(amesh, s.spec) if isinstance(s, NamedSharding) else s


def make_sharded_sampler(
    logits_fn_factory: Callable[[Any], LogitsFn],
    *,
    num_tokens: int,
    splits: int,
    vocab_size: int,
    mesh=None,
    params_sharding=None,
    **sample_kwargs,
):
    """Jitted fn(params, rng, labels) -> (B, L, S) tokens, batch sharded over `mesh`.

    `logits_fn_factory(params)` builds the logits closure inside the jitted function, so params
    stay an explicit argument (never baked in as constants). With `mesh` (a
    softdimo_jax.runtime.mesh mesh), labels and outputs are split over all mesh axes and the batch
    size must be a multiple of the mesh size; params are replicated unless `params_sharding`
    (a sharding or a pytree of them, e.g. meshlib.params_shardings(mesh, ..., fsdp=True))
    says otherwise. Outputs live on the Auto-typed twin of the mesh (meshlib.as_auto_mesh).
    """
    kwargs = dict(num_tokens=num_tokens, splits=splits, vocab_size=vocab_size, **sample_kwargs)

    def run(params, rng, labels):
        return maskbit_sample(logits_fn_factory(params), rng, labels, **kwargs)

    if mesh is None:
        jitted = jax.jit(run)
    else:
        amesh = meshlib.as_auto_mesh(mesh)
        batch = NamedSharding(amesh, PartitionSpec(meshlib.DATA_AXES))
        out_sharding = NamedSharding(amesh, PartitionSpec(meshlib.DATA_AXES, None, None))
        if sample_kwargs.get("return_intermediates"):
            # intermediates carry the step axis first; their batch axis is axis 1.
            step_batch = NamedSharding(amesh, PartitionSpec(None, meshlib.DATA_AXES))
            out_sharding = (out_sharding, {"predicted": step_batch, "tokens": step_batch})
        if params_sharding is None:
            params_in = NamedSharding(amesh, PartitionSpec())
        else:
            params_in = jax.tree.map(lambda s: _auto_sharding(s, amesh), params_sharding,
                                     is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
        jitted = jax.jit(
            run,
            in_shardings=(params_in, NamedSharding(amesh, PartitionSpec()), batch),
            out_shardings=out_sharding,
        )

    @functools.wraps(run)
    def sampler(params, rng, labels):
        labels = jnp.asarray(labels, jnp.int32)
        if mesh is not None:
            meshlib.check_batch_divisible(labels.shape[0], mesh)
        cache: dict = {}
        params, rng, labels = jax.tree.map(lambda x: _untyped(x, cache), (params, rng, labels))
        return jitted(params, rng, labels)

    sampler.jitted = jitted
    return sampler


def lfq_bert_logits_fn(model, params) -> LogitsFn:
    """The deterministic (dropout off) logits closure of an LFQBert-style module."""

    def logits_fn(tokens, labels, drop_label_mask):
        return model.apply({"params": params}, tokens, labels, drop_label_mask=drop_label_mask, deterministic=True)

    return logits_fn


def make_maskbit_teacher_sampler(model, *, mesh=None, params_sharding=None, **sample_kwargs):
    """Jitted fn(params, rng, labels) -> (B, L, S) sub-tokens sampled from an LFQBert teacher.

    Sizes come from the module (num_tokens, num_bits, splits); sampling settings default to
    MaskBit's released ImageNet ones (IMAGENET_DEFAULTS) and can be overridden by keyword.
    Merge the result into full token ids with lfq.merge_splits(tokens, num_bits, splits).
    """
    for field in ("num_tokens", "num_bits", "splits"):
        if not hasattr(model, field):
            raise TypeError(f"{type(model).__name__} has no `{field}` field; expected an LFQBert-like module")
    if model.num_bits % model.splits:
        raise ValueError(f"num_bits={model.num_bits} is not divisible by splits={model.splits}")
    settings = {**IMAGENET_DEFAULTS, **sample_kwargs}
    return make_sharded_sampler(
        lambda params: lfq_bert_logits_fn(model, params),
        num_tokens=model.num_tokens,
        splits=model.splits,
        vocab_size=2 ** (model.num_bits // model.splits),
        mesh=mesh,
        params_sharding=params_sharding,
        **settings,
    )
