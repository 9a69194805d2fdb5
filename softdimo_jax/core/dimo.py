"""Di[M]O distillation (SPEC §1.1): one iteration = one generator + one auxiliary update.

Three networks of the teacher's architecture: the frozen teacher φ, the one-step generator
θ and the auxiliary ψ, both initialised as copies of φ. Per iteration:

1. initial state: labels y ~ U{classes}; tokens uniform over V with exactly
   k0 = round(r_init·L) positions set to MASK (argsort of uniform noise), embedded and
   perturbed, e ← σ·ε + sqrt(1−σ²)·e;
2. z_θ = G_θ(e, y); x_θ ~ Cat(softmax(z_θ / T_gen));
3. forward-mask x_θ with the teacher's schedule, an exact count k = max(1, round(r·L)) per
   sample (per position, or per split for MaskBit);
4. teacher logits with CFG (one forward over a doubled batch, deterministic), auxiliary
   logits, both without gradient;
5. generalised Jeffreys gradient g on the logits, zero on unmasked positions, non-finite → 0;
6. generator update from jax.vjp of z_θ with cotangent g / B;
7. auxiliary cross-entropy (label smoothing) on a fresh generator sample, masked the same way;
8. EMA of θ with rate min(ema_max, (1 + step) / (10 + step)).

The teacher reaches the step as a separate, non-donated (possibly FSDP-sharded) argument;
the state is donated. The batch is generated on device from the rng (the method is
data-free), so multi-host runs need no per-host input pipeline: every process runs the
same program on the global arrays.

MaskBit specifics: tokens are (B, L, S) sub-token ids; the initial MASK state is chosen per
position (all S splits of a chosen token are MASK: a token the generator must invent
entirely); `mask_mode='split'` lets each split of the forward mask draw its own positions.
Architectures without splits use S = 1.

Refinement phases (GAN, reward) add a differentiable loss on z_θ through `extra_loss`
(an explicit argument of `step_fn`): its ∂L/∂z_θ joins the Di[M]O cotangent, so one
generator backward serves both terms. The step is pure; `softdimo_jax.runtime.trainer`
jits it (the one place where training steps are compiled).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from softdimo_jax.core.masking import forward_mask, initial_tokens
from softdimo_jax.core.optim import (distill_optimizer, ema_rate, frozen_labels, lr_schedule,
                                     resolve_frozen)
from softdimo_jax.runtime import mesh as meshlib

# fold_in constant of the extra loss's random stream (GAN masks, Gumbel noise, ...): keeps
# it apart from the five streams the generator half of the step splits off.
EXTRA_LOSS_STREAM = 0x6A4

# extra_loss(z (stop-gradient, float32), labels, rng) -> (loss, (stats dict, aux output))
ExtraLoss = Callable[[Any, Any, Any], Any]


def perturb(embeddings, noise, sigma: float):
    """e ← σ·ε + sqrt(1−σ²)·e."""
    return sigma * noise.astype(embeddings.dtype) + math.sqrt(1.0 - sigma**2) * embeddings


def cfg_combine(z_cond, z_uncond, scale: float, formula: str):
    if formula == "uncond_plus":  # u + w (c − u)
        return z_uncond + scale * (z_cond - z_uncond)
    if formula == "cond_plus":  # c + s (c − u)
        return z_cond + scale * (z_cond - z_uncond)
    raise ValueError(f"unknown cfg_formula {formula!r}; use 'uncond_plus' (u + w(c-u)) or 'cond_plus' (c + s(c-u))")


def teacher_cfg_logits(adapter, teacher_params, tokens, labels, scale: float, formula: str):
    """Guided teacher logits. On accelerators the conditional and unconditional passes run
    as one doubled-batch forward; on CPU as two forwards of the batch (the doubled batch's
    (2B, h, L, L) attention tensors fall out of cache: S benchmark 240 ms vs 2 x 95 ms)."""
    if (formula == "cond_plus" and scale == 0.0):
        return adapter.teacher_logits(teacher_params, tokens, labels)
    if formula == "uncond_plus" and scale == 1.0:
        return adapter.teacher_logits(teacher_params, tokens, labels)
    b = tokens.shape[0]
    if jax.default_backend() == "cpu":
        cond = adapter.teacher_logits(teacher_params, tokens, labels)
        uncond = adapter.teacher_logits(teacher_params, tokens, labels,
                                        drop_label_mask=jnp.ones((b,), bool))
        return cfg_combine(cond, uncond, scale, formula)
    both = adapter.teacher_logits(
        teacher_params,
        jnp.concatenate([tokens, tokens]),
        jax.tree.map(lambda l: jnp.concatenate([l, l]), labels),
        drop_label_mask=jnp.arange(2 * b) >= b,
    )
    return cfg_combine(both[:b], both[b:], scale, formula)


def jeffreys_grad(z_teacher, z_aux, mask, beta: float):
    """Generalised Jeffreys gradient on the logits (…, V); zero where mask (…) is false.

    g_FKL = p_A − p_T;  g_RKL = p_A ⊙ (log p_A − log p_T − RKL);  g = (1−β) g_FKL + β g_RKL.
    Non-finite entries (e.g. −inf teacher logits) become 0.
    """
    logp_t = jax.nn.log_softmax(z_teacher.astype(jnp.float32), axis=-1)
    logp_a = jax.nn.log_softmax(z_aux.astype(jnp.float32), axis=-1)
    p_t, p_a = jnp.exp(logp_t), jnp.exp(logp_a)
    g = jnp.zeros_like(p_a)
    if beta != 1.0:
        g = g + (1.0 - beta) * (p_a - p_t)
    if beta != 0.0:
        diff = logp_a - logp_t
        rkl = jnp.sum(p_a * diff, axis=-1, keepdims=True)
        g = g + beta * (p_a * (diff - rkl))
    g = jnp.where(jnp.asarray(mask, bool)[..., None], g, 0.0)
    return jnp.where(jnp.isfinite(g), g, 0.0)


def divergences(z_teacher, z_aux, mask):
    """Mean forward KL(p_T‖p_A) and reverse KL(p_A‖p_T) over masked positions (for logs)."""
    logp_t = jax.nn.log_softmax(z_teacher.astype(jnp.float32), axis=-1)
    logp_a = jax.nn.log_softmax(z_aux.astype(jnp.float32), axis=-1)
    fkl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_a), axis=-1)
    rkl = jnp.sum(jnp.exp(logp_a) * (logp_a - logp_t), axis=-1)
    m = jnp.asarray(mask, jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    clean = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
    return jnp.sum(clean(fkl) * m) / n, jnp.sum(clean(rkl) * m) / n


def aux_cross_entropy(logits, targets, mask, label_smoothing: float):
    """Mean label-smoothed cross-entropy over masked (sub-)positions, and the accuracy there."""
    v = logits.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(targets, v), label_smoothing)
    ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
    m = jnp.asarray(mask, jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * m) / n
    return jnp.sum(ce * m) / n, acc


# ----------------------------------------------------------------------------------------
# State and the iteration.
# ----------------------------------------------------------------------------------------


def refine_distill_config(distill_config, phase_config):
    """The distillation config with a refinement phase's generator optimiser and batch size.

    The auxiliary keeps the distillation learning rate (`aux_lr`); it shares the phase's
    optimiser family (Distiller builds both from one config)."""
    c = distill_config.copy_and_resolve_references()
    aux_lr = distill_config.lr if distill_config.aux_lr is None or distill_config.aux_lr < 0 else distill_config.aux_lr
    c.aux_lr = float(aux_lr)
    c.optimizer = str(phase_config.gen_optimizer)
    c.lr = float(phase_config.gen_lr)
    c.weight_decay = float(phase_config.gen_weight_decay)
    c.warmup_steps = int(phase_config.gen_warmup_steps)
    c.grad_clip = float(phase_config.gen_grad_clip)
    c.batch_size = int(phase_config.batch_size)
    return c


@flax.struct.dataclass
class DistillState:
    step: jnp.ndarray
    gen_params: Any
    aux_params: Any
    ema_params: Any
    gen_opt_state: Any
    aux_opt_state: Any


def generator_params(state: DistillState, use_ema: bool = True):
    """The generator weights of a `DistillState`: the EMA (the default, as in the
    reference) or the raw weights."""
    return state.ema_params if use_ema else state.gen_params


class Distiller:
    """Builds the state from a teacher and defines the (pure) iteration over a mesh.

    `step_fn(state, teacher_params, rng)` folds `state.step` into `rng`, so a run resumed
    from a checkpoint replays exactly the iterations an uninterrupted run would have.
    `w_dimo` scales the Di[M]O term of the generator gradient (refinement phases; 0 leaves
    only the extra loss).
    """

    def __init__(self, adapter, config, mesh=None, w_dimo: float = 1.0):
        self.adapter = adapter
        self.config = config
        self.w_dimo = float(w_dimo)
        mesh = mesh if mesh is not None else meshlib.make_mesh(
            None if config.num_devices in (-1, 0, None) else config.num_devices, config.fsdp)
        self.mesh = meshlib.as_auto_mesh(mesh)
        self.fsdp = self.mesh.shape["fsdp"] > 1
        meshlib.check_batch_divisible(int(config.batch_size), self.mesh)
        if not 0.0 <= config.sigma_init <= 1.0:
            raise ValueError(f"sigma_init must lie in [0, 1], got {config.sigma_init}")
        if not 0.0 <= config.r_init <= 1.0:
            raise ValueError(f"r_init must lie in [0, 1], got {config.r_init}")
        if config.gen_temperature <= 0:
            raise ValueError(f"gen_temperature must be > 0, got {config.gen_temperature}")
        self._labels = None

    # --- state -------------------------------------------------------------------------
    def _optimizers(self, params):
        if self._labels is None:
            patterns = resolve_frozen(params, tuple(self.config.frozen), self.adapter)
            self._labels = frozen_labels(params, patterns)
        aux_lr = self.config.lr if self.config.aux_lr is None or self.config.aux_lr < 0 else self.config.aux_lr
        return (distill_optimizer(self.config, self.config.lr, self._labels),
                distill_optimizer(self.config, aux_lr, self._labels))

    def teacher_shardings(self, teacher_params):
        shapes = jax.eval_shape(lambda p: p, teacher_params)
        return meshlib.params_shardings(self.mesh, shapes, self.fsdp)

    def place_teacher(self, teacher_params):
        """Teacher params on the mesh (FSDP-sharded when fsdp > 1)."""
        return meshlib.place(teacher_params, self.teacher_shardings(teacher_params))

    def init_fn(self, teacher_params) -> DistillState:
        """θ, ψ and the EMA as float32 copies of the teacher (master weights)."""
        gen_opt, aux_opt = self._optimizers(teacher_params)
        # `x + 0` makes fresh buffers: generator, auxiliary and EMA must not alias the teacher
        # (or each other), since the state is donated every step.
        copy = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) + 0.0, t)
        gen, aux, ema = copy(teacher_params), copy(teacher_params), copy(teacher_params)
        return DistillState(
            step=jnp.zeros((), jnp.int32), gen_params=gen, aux_params=aux, ema_params=ema,
            gen_opt_state=gen_opt.init(gen), aux_opt_state=aux_opt.init(aux),
        )

    def restart_from(self, dimo_state: DistillState) -> DistillState:
        """A refinement phase's start from a distilled state: θ, ψ and the EMA carried over,
        fresh optimiser states for this phase's optimisers (their structure may differ), and
        step 0, so the EMA warm-up min(ema_max, (1+s)/(10+s)) restarts and the EMA follows
        this phase's weights instead of lagging on the last one."""
        gen_opt, aux_opt = self._optimizers(dimo_state.gen_params)
        return dimo_state.replace(
            step=jnp.zeros_like(dimo_state.step),
            gen_opt_state=gen_opt.init(dimo_state.gen_params),
            aux_opt_state=aux_opt.init(dimo_state.aux_params),
        )

    def state_shardings(self, teacher_params):
        shapes = jax.eval_shape(self.init_fn, teacher_params)
        return meshlib.params_shardings(self.mesh, shapes, self.fsdp)

    def init_state(self, teacher_params) -> DistillState:
        """`init_fn` on the mesh, directly in the state's (possibly FSDP) layout."""
        teacher_params = self.place_teacher(teacher_params)
        out = self.state_shardings(teacher_params)
        return jax.jit(self.init_fn, out_shardings=out)(teacher_params)

    def abstract_state(self, teacher_params):
        """ShapeDtypeStructs with shardings, for restoring a checkpoint onto the mesh."""
        return meshlib.abstract_with_shardings(jax.eval_shape(self.init_fn, teacher_params),
                                               self.state_shardings(teacher_params))

    # --- the iteration -----------------------------------------------------------------
    def _constrain(self, x):
        return jax.lax.with_sharding_constraint(x, meshlib.batch_sharding(self.mesh, x.ndim))

    def generator_inputs(self, params, rng, batch: int, conditions=None):
        """Labels, initial tokens and Gaussian noise of the one-step generator's input."""
        cfg, a = self.config, self.adapter
        k_tok, k_eps = jax.random.split(rng)
        labels, tokens = initial_tokens(k_tok, batch, a, cfg.r_init, cfg.init_mask_mode, conditions)
        labels, tokens = jax.tree.map(self._constrain, labels), self._constrain(tokens)
        return labels, tokens, k_eps

    def generator_logits(self, params, labels, tokens, k_eps, dropout_rng=None):
        e = self.adapter.embed(params, tokens)
        eps = self._constrain(jax.random.normal(k_eps, e.shape, jnp.float32))
        e = perturb(e, eps, self.config.sigma_init)
        return self.adapter.student_logits(params, labels, embeddings=e, rng=dropout_rng)

    def _sample(self, rng, logits):
        return self._constrain(jax.random.categorical(rng, logits / self.config.gen_temperature, axis=-1))

    def _mask(self, rng, tokens):
        b, length, splits = tokens.shape
        m = forward_mask(rng, b, length, splits, self.config.mask_schedule, self.config.mask_mode)
        m = self._constrain(m)
        return m, jnp.where(m, self.adapter.mask_token, tokens)

    def generator_cotangent(self, state, teacher_params, rng, conditions=None, extra_loss: ExtraLoss | None = None):
        """Steps 1-5 plus the vjp: returns (grads, cotangent, logits z_θ, stats, extra output)."""
        cfg, a = self.config, self.adapter
        b = int(cfg.batch_size)
        k_in, k_drop, k_sample, k_mask, k_aux = jax.random.split(rng, 5)
        labels, tokens, k_eps = self.generator_inputs(state.gen_params, k_in, b, conditions)
        z_gen, vjp = jax.vjp(
            lambda p: self.generator_logits(p, labels, tokens, k_eps, k_drop), state.gen_params)
        x_gen = self._sample(k_sample, jax.lax.stop_gradient(z_gen))
        mask, x_t = self._mask(k_mask, x_gen)
        z_t = teacher_cfg_logits(a, teacher_params, x_t, labels, cfg.cfg_scale, cfg.cfg_formula)
        z_t = jax.lax.stop_gradient(z_t / cfg.teacher_temperature)
        z_a = jax.lax.stop_gradient(a.student_logits(state.aux_params, labels, tokens=x_t, rng=k_aux))
        cot = jeffreys_grad(z_t, z_a, mask, cfg.beta) / b
        fkl, rkl = divergences(z_t, z_a, mask)
        stats = {"fkl": fkl, "rkl": rkl, "mask_frac": jnp.mean(mask.astype(jnp.float32)),
                 "gen_loss": 0.5 * b * jnp.sum(cot**2),
                 # g zeroes non-finite values, so watch the logits themselves (NaN guard).
                 "gen_logit_absmean": jnp.mean(jnp.abs(z_gen.astype(jnp.float32)))}
        cot, stats, extra_out = self._add_extra_loss(cot, z_gen, labels, rng, stats, extra_loss)
        (grads,) = vjp(cot.astype(z_gen.dtype))
        return grads, cot, z_gen, stats, extra_out

    def _add_extra_loss(self, cot_dimo, z_gen, labels, rng, stats, extra_loss):
        """w_dimo · g/B + ∂L_x/∂z_θ: the extra loss (GAN through the teacher, reward through
        the decoder) joins the Di[M]O cotangent. Plain Di[M]O: unchanged, no extra output."""
        if extra_loss is None and self.w_dimo == 1.0:
            return cot_dimo, stats, None
        stats["dimo_loss"] = stats.pop("gen_loss")
        cot, extra_out = self.w_dimo * cot_dimo, None
        if extra_loss is not None:
            z_sg = jax.lax.stop_gradient(z_gen).astype(jnp.float32)
            (x_loss, (x_stats, x_aux)), x_cot = jax.value_and_grad(extra_loss, has_aux=True)(
                z_sg, labels, jax.random.fold_in(rng, EXTRA_LOSS_STREAM))
            x_cot = jnp.where(jnp.isfinite(x_cot), x_cot, 0.0)
            cot = cot + x_cot
            stats.update(x_stats)
            stats["extra_loss"] = x_loss
            stats["extra_cot_norm"] = jnp.sqrt(jnp.sum(x_cot**2))
            stats["dimo_cot_norm"] = jnp.sqrt(jnp.sum(cot_dimo**2))
            extra_out = (x_aux, labels)
        stats["gen_loss"] = stats["dimo_loss"] * self.w_dimo + stats.get("extra_loss", 0.0)
        return cot, stats, extra_out

    def step_fn(self, state: DistillState, teacher_params, rng, conditions=None,
                extra_loss: ExtraLoss | None = None):
        """One iteration -> (new state, metrics, extra output). `conditions`: the per-step
        conditions batch of text-conditioned adapters (None for class labels, which the
        step draws itself). `extra_loss`: see the module docstring; its aux output comes
        back as (aux, generator labels), else None."""
        cfg, a = self.config, self.adapter
        b = int(cfg.batch_size)
        gen_opt, aux_opt = self._optimizers(state.gen_params)
        rng = jax.random.fold_in(rng, state.step)
        k_gen, k_in2, k_drop2, k_sample2, k_mask2, k_aux2 = jax.random.split(rng, 6)

        # Generator update.
        grads, _, _, stats, extra_out = self.generator_cotangent(state, teacher_params, k_gen, conditions,
                                                                 extra_loss)
        updates, gen_opt_state = gen_opt.update(grads, state.gen_opt_state, state.gen_params)
        gen_params = optax.apply_updates(state.gen_params, updates)

        # Auxiliary update on a fresh sample of the updated generator (no gradient into θ).
        labels2, tokens2, k_eps2 = self.generator_inputs(gen_params, k_in2, b, conditions)
        z2 = jax.lax.stop_gradient(self.generator_logits(gen_params, labels2, tokens2, k_eps2, k_drop2))
        x2 = self._sample(k_sample2, z2)
        mask2, x2_t = self._mask(k_mask2, x2)

        def aux_loss(p):
            logits = a.student_logits(p, labels2, tokens=x2_t, rng=k_aux2)
            return aux_cross_entropy(logits, x2, mask2, cfg.aux_label_smoothing)

        (aux_loss_v, aux_acc), aux_grads = jax.value_and_grad(aux_loss, has_aux=True)(state.aux_params)
        aux_updates, aux_opt_state = aux_opt.update(aux_grads, state.aux_opt_state, state.aux_params)
        aux_params = optax.apply_updates(state.aux_params, aux_updates)

        # EMA of the generator.
        rate = ema_rate(state.step, cfg.ema_max)
        # Frozen leaves are copied, not averaged: rate·p + (1−rate)·p can differ from p by
        # round-off, and frozen means bit-identical to the teacher.
        ema = jax.tree.map(
            lambda e, p, lab: p if lab == "frozen" else rate * e + (1.0 - rate) * p,
            state.ema_params, gen_params, self._labels)

        metrics = dict(stats)
        metrics.update(
            loss=stats["gen_loss"] + aux_loss_v,
            aux_loss=aux_loss_v, aux_acc=aux_acc, ema_rate=rate,
            gen_grad_norm=optax.tree.norm(grads), aux_grad_norm=optax.tree.norm(aux_grads),
            lr=lr_schedule(cfg.lr, warmup_steps=cfg.warmup_steps)(state.step),
        )
        new_state = DistillState(
            step=state.step + 1, gen_params=gen_params, aux_params=aux_params, ema_params=ema,
            gen_opt_state=gen_opt_state, aux_opt_state=aux_opt_state,
        )
        return new_state, metrics, extra_out

    def trainer_step_fn(self):
        """`step_fn(state, batch, rng, step, frozen)` of the Trainer contract, frozen =
        {"teacher": params}; `batch` is None (class labels drawn in the step) or the step's
        text-conditions batch. The Trainer's rng is already folded with the step."""
        def step_fn(state, batch, rng, step, frozen):
            del step
            new_state, metrics, _ = self.step_fn(state, frozen["teacher"], rng, batch)
            return new_state, metrics

        return step_fn
