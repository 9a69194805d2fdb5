"""Teacher (MDM) training step: the EMA warm-up keeps no trace of the random init."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from softdimo_jax.core import objectives
from softdimo_jax.core.optim import ema_rate


def _train_cfg(ema_warmup):
    return ml_collections.ConfigDict(dict(
        num_steps=10, learning_rate=1e-2, warmup_steps=1, weight_decay=0.0, b1=0.9, b2=0.99,
        grad_clip=1.0, label_smoothing=0.1, class_dropout=0.1, mask_schedule="arccos",
        ema_decay=0.999, ema_warmup=ema_warmup,
    ))


@pytest.mark.parametrize("ema_warmup", [True, False])
def test_teacher_step_ema_rate(ema_warmup):
    model = objectives.teacher_from_config(
        dict(splits=2, hidden_dim=16, depth=1, heads=2, mlp_dim=32, num_classes=10, dropout=0.0),
        num_tokens=4, num_bits=4)
    cfg = _train_cfg(ema_warmup)
    init_fn, step_fn = objectives.make_teacher_phase(model, cfg)
    state = init_fn(jax.random.PRNGKey(0))
    batch = {"tokens": jnp.asarray(np.random.RandomState(0).randint(0, 16, (8, 4))),
             "label": jnp.arange(8) % 10}
    init = state["params"]
    new, metrics = jax.jit(step_fn)(state, batch, jax.random.PRNGKey(1), jnp.int32(0), None)
    assert np.isfinite(float(metrics["loss"]))
    decay = 0.1 if ema_warmup else 0.999  # (1 + 0) / (10 + 0) at step 0
    expect = jax.tree.map(lambda i, p: decay * i + (1 - decay) * p, init, new["params"])
    for e, x in zip(jax.tree.leaves(new["ema"]), jax.tree.leaves(expect)):
        np.testing.assert_allclose(e, x, rtol=1e-5, atol=1e-6)


def test_ema_rate_ramps_to_its_cap():
    np.testing.assert_allclose(float(ema_rate(0, 0.999)), 0.1)
    np.testing.assert_allclose(float(ema_rate(90, 0.999)), 0.91)
    np.testing.assert_allclose(float(ema_rate(10**6, 0.999)), 0.999)
