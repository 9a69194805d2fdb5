"""Exponential moving averages of parameters (no orbax/clu imports: the distillation step
and its benchmark use them without the training-loop machinery)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_rate(step, ema_max: float):
    """EMA decay with warm-up, min(ema_max, (1 + step) / (10 + step)): early steps average
    over few updates, so the random initialisation does not linger in the average (with a
    fixed 0.999, e^-2.5 = 8% of it is still there after 2,500 steps)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(ema_max, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay):
    """ema ← decay·ema + (1 − decay)·params (decay may be a traced scalar)."""
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
