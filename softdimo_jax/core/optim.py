"""The one optimiser builder of every phase, frozen parameter groups, and EMA.

Teacher, tokenizer and classifier train with warm-up + cosine decay; Di[M]O's generator
and auxiliary (and the GAN / reward phases) with warm-up then a constant rate, Adam or
AdamW, and frozen groups that receive exactly-zero updates.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine")


def lr_schedule(learning_rate: float, *, warmup_steps: int = 0, schedule: str = "constant",
                num_steps: int | None = None, end_lr_fraction: float = 0.0) -> optax.Schedule:
    """'constant': linear warm-up from 0 over `warmup_steps` (none when 0), then constant.
    'cosine': linear warm-up (at most num_steps − 1 steps), then cosine decay to
    learning_rate · end_lr_fraction at `num_steps`."""
    w = int(warmup_steps)
    if schedule == "constant":
        if w <= 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, w), optax.constant_schedule(learning_rate)], [w])
    if schedule == "cosine":
        if num_steps is None:
            raise ValueError("the cosine schedule needs num_steps")
        w = min(w, max(int(num_steps) - 1, 0))
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(w, 1), max(int(num_steps), w + 1),
            end_value=learning_rate * end_lr_fraction)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; use one of {SCHEDULES}")


def make_optimizer(learning_rate: float, *, optimizer: str = "adamw", warmup_steps: int = 0,
                   schedule: str = "constant", num_steps: int | None = None,
                   end_lr_fraction: float = 0.0, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, grad_clip: float | None = None,
                   frozen_labels: Any = None) -> optax.GradientTransformation:
    """clip (grad_clip > 0) → Adam / AdamW on `lr_schedule(...)`. With `frozen_labels` (a
    pytree of 'frozen' / 'trainable', see `frozen_labels`) frozen leaves get exactly-zero
    updates, so they never move."""
    lr = lr_schedule(learning_rate, warmup_steps=warmup_steps, schedule=schedule,
                     num_steps=num_steps, end_lr_fraction=end_lr_fraction)
    if optimizer == "adam":
        opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    elif optimizer == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'adam' or 'adamw'")
    if grad_clip and grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
    if frozen_labels is None:
        return opt
    return optax.multi_transform({"trainable": opt, "frozen": optax.set_to_zero()}, frozen_labels)


def distill_optimizer(config, learning_rate: float, labels) -> optax.GradientTransformation:
    """The generator / auxiliary optimiser of a distill ConfigDict (warm-up then constant)."""
    return make_optimizer(
        learning_rate, optimizer=config.optimizer, warmup_steps=config.warmup_steps,
        schedule="constant", weight_decay=config.weight_decay, b1=config.b1, b2=config.b2,
        eps=config.eps, grad_clip=config.grad_clip, frozen_labels=labels)


# ----------------------------------------------------------------------------- frozen groups


def path_str(path) -> str:
    """'a/b/0' for a jax tree path (dict keys, attributes and indices alike)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _matches(path: str, pattern: str) -> bool:
    return path == pattern or path.startswith(pattern + "/")


def resolve_frozen(params, names, adapter=None) -> list[str]:
    """Expands logical group names (adapter.frozen_groups) and raw paths; every pattern must
    match at least one parameter."""
    groups = getattr(adapter, "frozen_groups", {}) if adapter is not None else {}
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    patterns = []
    for name in names:
        for pat in groups.get(name, (name,)):
            if not any(_matches(p, pat) for p in paths):
                top = sorted({p.split("/")[0] for p in paths})
                raise ValueError(
                    f"frozen entry {name!r} ({pat!r}) matches no parameter; use one of the logical "
                    f"names {sorted(groups)} or a parameter path starting with one of {top}"
                )
            patterns.append(pat)
    return patterns


def frozen_labels(params, patterns) -> Any:
    """Pytree of 'frozen' / 'trainable' labels for optax.multi_transform."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(_matches(path_str(path), p) for p in patterns) else "trainable",
        params)


# ----------------------------------------------------------------------------- EMA


def ema_rate(step, ema_max: float):
    """EMA decay with warm-up, min(ema_max, (1 + step) / (10 + step)): early steps average
    over few updates, so the random initialisation does not linger in the average (with a
    fixed 0.999, e^-2.5 = 8% of it is still there after 2,500 steps)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(ema_max, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay):
    """ema ← decay·ema + (1 − decay)·params (decay may be a traced scalar)."""
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
