"""Di[M]O distillation (SPEC §1.1): one jitted iteration = one generator + one auxiliary update.

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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from softdimo_jax import parallel
from softdimo_jax.models import lfq
from softdimo_jax.training.ema import ema_rate

# ----------------------------------------------------------------------------------------
# Model adapter: how the algorithm talks to one teacher architecture.
# ----------------------------------------------------------------------------------------


def teacher_student_clones(module: nn.Module, *, dropout: float | None = None, dtype=None,
                           remat: bool | None = None):
    """(teacher, student) copies of one module class for an adapter: both in `dtype` (default
    the module's); the teacher never remats (no backward through it); the student takes
    `remat` and `dropout` when given (None keeps the module's)."""
    dtype = module.dtype if dtype is None else jnp.dtype(dtype)
    teacher = module.clone(dtype=dtype, remat=False)
    overrides = dict(dtype=dtype, remat=module.remat if remat is None else bool(remat))
    if dropout is not None:
        overrides["dropout"] = float(dropout)
    return teacher, module.clone(**overrides)


@dataclasses.dataclass(frozen=True)
class LFQBertAdapter:
    """Wraps a MaskBit `LFQBert` for distillation.

    `teacher` runs deterministically; `student` (generator and auxiliary) carries the
    distillation dropout, compute dtype and remat setting. Parameters are shared in layout.
    """

    teacher: nn.Module
    student: nn.Module
    # PRNG of the dropout masks: 'threefry' (default; identical on any mesh) or 'rbg' /
    # 'unsafe_rbg' (XLA's RngBitGenerator: about half the CPU cost per mask, but the masks
    # may depend on the sharding and the XLA version).
    dropout_rng: str = "threefry"

    # Logical frozen groups -> parameter paths of this architecture.
    frozen_groups = {
        "input_embedding": ("input_proj",),
        "output_bias": ("prediction/bias",),
        "position_embedding": ("pos_emb",),
    }

    @classmethod
    def from_module(cls, module: nn.Module, *, dropout: float | None = None, dtype=None,
                    remat: bool | None = None, dropout_rng: str = "threefry") -> "LFQBertAdapter":
        teacher, student = teacher_student_clones(module, dropout=dropout, dtype=dtype, remat=remat)
        if dropout_rng not in ("threefry", "rbg", "unsafe_rbg"):
            raise ValueError(f"dropout_rng must be 'threefry', 'rbg' or 'unsafe_rbg', got {dropout_rng!r}")
        return cls(teacher=teacher, student=student, dropout_rng=dropout_rng)

    # Shapes.
    @property
    def num_tokens(self) -> int:
        return self.student.num_tokens

    @property
    def splits(self) -> int:
        return self.student.splits

    @property
    def vocab_size(self) -> int:
        return self.student.vocab_size

    @property
    def mask_token(self) -> int:
        return self.student.mask_token

    @property
    def num_classes(self) -> int:
        return self.student.num_classes

    @property
    def student_dropout(self) -> float:
        return float(self.student.dropout)

    # Calls.
    def embed(self, params, tokens):
        """(B, L, S) sub-token ids -> (B, L, d) input embeddings of the student."""
        bits = lfq.subtokens_to_bits(tokens, self.student.num_bits, self.student.splits)
        return self.student.apply({"params": params}, bits, method=type(self.student).embed_bits)

    def student_logits(self, params, labels, *, tokens=None, embeddings=None, rng=None):
        """Generator / auxiliary forward; dropout active when rng is given."""
        train = rng is not None and self.student_dropout > 0
        if train and self.dropout_rng != "threefry":
            rng = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl=self.dropout_rng)
        return self.student.apply(
            {"params": params}, tokens, labels, input_embeddings=embeddings,
            deterministic=not train, rngs={"dropout": rng} if train else None,
        )

    def teacher_logits(self, params, tokens, labels, drop_label_mask=None):
        return self.teacher.apply(
            {"params": params}, tokens, labels, drop_label_mask=drop_label_mask, deterministic=True
        )


def make_adapter(module: nn.Module, config, **kwargs):
    """The adapter for `module` under `config` (a distill ConfigDict). kwargs go to the
    MaskGIT / MaskGen adapters (softdimo_jax.training.adapters; MaskGen: null condition)."""
    from softdimo_jax.models.maskbit_bert import LFQBert
    from softdimo_jax.training.adapters import make_family_adapter

    if isinstance(module, LFQBert):
        return LFQBertAdapter.from_module(
            module, dropout=config.dropout, dtype=config.compute_dtype, remat=config.remat,
            dropout_rng=config.get("dropout_rng", "threefry"),
        )
    adapter = make_family_adapter(module, config, **kwargs)
    if adapter is not None:
        return adapter
    raise NotImplementedError(
        f"no distillation adapter for {type(module).__name__}; add one next to LFQBertAdapter"
    )


# ----------------------------------------------------------------------------------------
# Pieces of the iteration (pure functions; tested one by one).
# ----------------------------------------------------------------------------------------


def mask_ratio(u, schedule: str = "arccos"):
    """Fraction of masked positions for u ~ U(0, 1)."""
    if schedule == "arccos":
        return jnp.arccos(u) / (math.pi / 2)
    if schedule == "cosine":
        return jnp.cos(u * math.pi / 2)
    if schedule == "linear":
        return 1.0 - u
    raise ValueError(f"unknown mask schedule {schedule!r}; use 'arccos', 'cosine' or 'linear'")


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


def initial_tokens(rng, batch: int, adapter, r_init: float, mode: str = "position", conditions=None):
    """Labels (B,) and initial tokens (B, L, S): uniform over V, round(r_init·L) MASKed.

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
# Frozen parameters and optimisers.
# ----------------------------------------------------------------------------------------


def _path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def resolve_frozen(params, names, adapter=None) -> list[str]:
    """Expands logical group names (adapter.frozen_groups) and raw paths; every pattern must
    match at least one parameter."""
    groups = getattr(adapter, "frozen_groups", {}) if adapter is not None else {}
    paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    patterns = []
    for name in names:
        for pat in groups.get(name, (name,)):
            if not any(p == pat or p.startswith(pat + "/") for p in paths):
                top = sorted({p.split("/")[0] for p in paths})
                raise ValueError(
                    f"frozen entry {name!r} ({pat!r}) matches no parameter; use one of the logical "
                    f"names {sorted(groups)} or a parameter path starting with one of {top}"
                )
            patterns.append(pat)
    return patterns


def frozen_labels(params, patterns) -> Any:
    """Pytree of 'frozen' / 'trainable' labels for optax.multi_transform."""
    def label(path, _):
        p = _path_str(path)
        return "frozen" if any(p == pat or p.startswith(pat + "/") for pat in patterns) else "trainable"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, lr: float, labels) -> optax.GradientTransformation:
    """clip → Adam/AdamW with linear warm-up then constant lr, on trainable params only;
    frozen params get exactly-zero updates (they never move)."""
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(1, int(config.warmup_steps))), optax.constant_schedule(lr)],
        [max(1, int(config.warmup_steps))],
    ) if config.warmup_steps > 0 else optax.constant_schedule(lr)
    if config.optimizer == "adam":
        opt = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
    elif config.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                          weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'adam' or 'adamw'")
    if config.grad_clip and config.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
    return optax.multi_transform({"trainable": opt, "frozen": optax.set_to_zero()}, labels)


def lr_at(config, lr: float, step):
    w = int(config.warmup_steps)
    if w <= 0:
        return jnp.asarray(lr, jnp.float32)
    return lr * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / w)


# ----------------------------------------------------------------------------------------
# State and the jitted step.
# ----------------------------------------------------------------------------------------


@flax.struct.dataclass
class DistillState:
    step: jnp.ndarray
    gen_params: Any
    aux_params: Any
    ema_params: Any
    gen_opt_state: Any
    aux_opt_state: Any


class Distiller:
    """Builds the state from a teacher and runs the jitted iteration over a mesh.

    `step(state, teacher_params, rng)` folds `state.step` into `rng`, so a run resumed from
    a checkpoint replays exactly the iterations an uninterrupted run would have.
    """

    def __init__(self, adapter, config, mesh=None, compiler_options: dict | None = None):
        self.adapter = adapter
        self.compiler_options = compiler_options  # e.g. a lower XLA optimisation level in tests
        self.config = config
        mesh = mesh if mesh is not None else parallel.make_mesh(
            None if config.num_devices in (-1, 0, None) else config.num_devices, config.fsdp)
        self.mesh = parallel.as_auto_mesh(mesh)
        self.fsdp = self.mesh.shape["fsdp"] > 1
        parallel.check_batch_divisible(int(config.batch_size), self.mesh)
        if not 0.0 <= config.sigma_init <= 1.0:
            raise ValueError(f"sigma_init must lie in [0, 1], got {config.sigma_init}")
        if not 0.0 <= config.r_init <= 1.0:
            raise ValueError(f"r_init must lie in [0, 1], got {config.r_init}")
        if config.gen_temperature <= 0:
            raise ValueError(f"gen_temperature must be > 0, got {config.gen_temperature}")
        self._step = None
        self._labels = None

    # --- state -------------------------------------------------------------------------
    def _optimizers(self, params):
        if self._labels is None:
            patterns = resolve_frozen(params, tuple(self.config.frozen), self.adapter)
            self._labels = frozen_labels(params, patterns)
        aux_lr = self.config.lr if self.config.aux_lr is None or self.config.aux_lr < 0 else self.config.aux_lr
        return (make_optimizer(self.config, self.config.lr, self._labels),
                make_optimizer(self.config, aux_lr, self._labels))

    def teacher_shardings(self, teacher_params):
        shapes = jax.eval_shape(lambda p: p, teacher_params)
        return parallel.params_shardings(self.mesh, shapes, self.fsdp)

    def place_teacher(self, teacher_params):
        """Teacher params on the mesh (FSDP-sharded when fsdp > 1)."""
        return jax.device_put(teacher_params, self.teacher_shardings(teacher_params))

    def _init_fn(self, teacher_params):
        gen_opt, aux_opt = self._optimizers(teacher_params)
        # `x + 0` makes fresh buffers: generator, auxiliary and EMA must not alias the teacher
        # (or each other), since the state is donated every step.
        copy = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) + 0.0, t)
        gen, aux, ema = copy(teacher_params), copy(teacher_params), copy(teacher_params)
        return DistillState(
            step=jnp.zeros((), jnp.int32), gen_params=gen, aux_params=aux, ema_params=ema,
            gen_opt_state=gen_opt.init(gen), aux_opt_state=aux_opt.init(aux),
        )

    def state_shardings(self, teacher_params):
        shapes = jax.eval_shape(self._init_fn, teacher_params)
        return parallel.params_shardings(self.mesh, shapes, self.fsdp)

    def init_state(self, teacher_params) -> DistillState:
        """θ, ψ and the EMA as float32 copies of the teacher (master weights), on the mesh."""
        teacher_params = self.place_teacher(teacher_params)
        out = self.state_shardings(teacher_params)
        return jax.jit(self._init_fn, out_shardings=out)(teacher_params)

    def abstract_state(self, teacher_params):
        """ShapeDtypeStructs with shardings, for restoring a checkpoint onto the mesh."""
        shapes = jax.eval_shape(self._init_fn, teacher_params)
        shard = self.state_shardings(teacher_params)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shard)

    # --- the iteration -----------------------------------------------------------------
    def _constrain(self, x):
        return jax.lax.with_sharding_constraint(x, parallel.batch_sharding(self.mesh, x.ndim))

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

    def generator_cotangent(self, state, teacher_params, rng, conditions=None):
        """Steps 1-5 plus the vjp: returns (grads, cotangent g/B, logits z_θ, stats)."""
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
        cot, stats = self.combine_cotangent(cot, z_gen, labels, rng, stats)
        (grads,) = vjp(cot.astype(z_gen.dtype))
        return grads, cot, z_gen, stats

    def combine_cotangent(self, cot, z_gen, labels, rng, stats):
        """Hook for phases that add a loss on z_θ (GAN, reward): their ∂L/∂z_θ joins the Di[M]O
        cotangent so one generator backward serves both. Plain Di[M]O: unchanged."""
        return cot, stats

    def _step_fn(self, state: DistillState, teacher_params, rng, conditions=None):
        cfg, a = self.config, self.adapter
        b = int(cfg.batch_size)
        gen_opt, aux_opt = self._optimizers(state.gen_params)
        rng = jax.random.fold_in(rng, state.step)
        k_gen, k_in2, k_drop2, k_sample2, k_mask2, k_aux2 = jax.random.split(rng, 6)

        # Generator update.
        grads, _, _, stats = self.generator_cotangent(state, teacher_params, k_gen, conditions)
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
            lr=lr_at(cfg, cfg.lr, state.step),
        )
        new_state = DistillState(
            step=state.step + 1, gen_params=gen_params, aux_params=aux_params, ema_params=ema,
            gen_opt_state=gen_opt_state, aux_opt_state=aux_opt_state,
        )
        return new_state, metrics

    def jit_step(self, teacher_params):
        """The jitted iteration `step(state, teacher_params, rng) -> (state, metrics)`,
        state donated, teacher not."""
        if self._step is None:
            rep = parallel.replicated(self.mesh)
            self._step = jax.jit(
                self._step_fn,
                # conditions (text-conditioned adapters): rows split over the batch axes.
                in_shardings=(self.state_shardings(teacher_params), self.teacher_shardings(teacher_params), rep,
                              parallel.batch_sharding(self.mesh, 1)),
                out_shardings=(self.state_shardings(teacher_params), rep),
                donate_argnums=(0,),
                compiler_options=self.compiler_options,
            )
        return self._step

    def step(self, state, teacher_params, rng, conditions=None):
        """`conditions`: the per-step conditions batch of text-conditioned adapters (None
        for class labels, which the step draws itself)."""
        return self.jit_step(teacher_params)(state, teacher_params, rng, conditions)
