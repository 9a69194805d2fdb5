"""The shared training loop: exact resume after a hard kill, 8-device step == 1-device step,
the non-finite guard, checkpoint/config mismatch errors, skip when complete."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.core.optim import ema_update, make_optimizer
from softdimo_jax.runtime.trainer import CheckpointMismatchError, NonFiniteLossError, Trainer

DIM = 6
BATCH = 16


def toy_phase(dim=DIM, nan_at=None):
    """Noisy linear regression with AdamW + EMA: enough state (opt, ema, rng) for resume."""
    opt = make_optimizer(0.05, schedule="cosine", num_steps=20, warmup_steps=3, weight_decay=0.01)

    def init_fn(rng):
        params = {"w": jax.random.normal(rng, (dim, 3)), "b": jnp.zeros((3,))}
        return {"params": params, "opt": opt.init(params), "ema": params}

    def step_fn(state, batch, rng, step, frozen):
        noise = 0.01 * jax.random.normal(rng, batch["y"].shape)

        def loss_fn(p):
            pred = batch["x"] @ p["w"] + p["b"] + frozen["shift"]
            return jnp.mean((pred - batch["y"] - noise) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(state["params"])
        upd, opt_state = opt.update(g, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], upd)
        ema = ema_update(state["ema"], params, 0.9)
        return {"params": params, "opt": opt_state, "ema": ema}, {"loss": loss}

    def batch_fn(step):
        r = np.random.default_rng([1, step])
        x = r.normal(size=(BATCH, dim)).astype(np.float32)
        y = (x @ np.ones((dim, 3)) * 0.5).astype(np.float32)
        if nan_at is not None and step >= nan_at:
            x[0, 0] = np.nan
        return {"x": x, "y": y}

    return init_fn, step_fn, batch_fn


def make_trainer(stage_dir, num_steps=8, mesh=None, dim=DIM, nan_at=None, **kw):
    init_fn, step_fn, batch_fn = toy_phase(dim, nan_at)
    return Trainer(
        "toy", stage_dir, init_fn, step_fn, batch_fn, num_steps=num_steps, seed=3,
        mesh=mesh or meshlib.make_mesh(1), frozen={"shift": np.float32(0.1)},
        checkpoint_every=2, keep=2, log_every=1, **kw,
    )


def _params(result):
    return jax.tree.map(np.asarray, result.state)


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_trainer import make_trainer

    def die(step, state):
        if step == 5:  # after step 5 ran; the step-4 save was issued asynchronously
            os.kill(os.getpid(), signal.SIGKILL)

    make_trainer({stage!r}, on_step_end=die).run()
    """
)


def test_resume_after_hard_kill_is_exact(tmp_path):
    ref = make_trainer(str(tmp_path / "ref")).run()
    assert ref.trained and ref.resumed_from is None

    stage = str(tmp_path / "killed")
    script = _KILL_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), stage=stage)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # New process state: new trainer objects, resume from the last complete checkpoint.
    resumed = make_trainer(stage).run()
    # Step 4 was saved asynchronously: it is either complete or (killed mid-write) ignored.
    assert resumed.resumed_from in (2, 4)
    jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(ref))


def test_complete_run_is_restored_not_retrained(tmp_path):
    first = make_trainer(str(tmp_path)).run()
    again = make_trainer(str(tmp_path)).run()
    assert not again.trained and again.step == 8
    jax.tree.map(np.testing.assert_array_equal, _params(again), _params(first))


@pytest.mark.parametrize("fsdp", [1, 2])
def test_eight_device_step_equals_one_device(fsdp):
    assert jax.device_count() == 8
    results = []
    for mesh in (meshlib.make_mesh(1), meshlib.make_mesh(8, fsdp=fsdp)):
        tr = make_trainer(None, mesh=mesh)
        state = tr.init_state()
        for step in range(3):
            state, metrics = tr.step(state, step)
        results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state)))
    (loss1, s1), (loss8, s8) = results
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s8, s1)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    tr = make_trainer(str(tmp_path), nan_at=5)
    with pytest.raises(NonFiniteLossError, match=r"step 6.*last good checkpoint \(step 4\)"):
        tr.run()
    assert make_trainer(str(tmp_path)).latest_step() == 4


def test_checkpoint_from_another_config_names_the_stage_dir(tmp_path):
    make_trainer(str(tmp_path), num_steps=2).run()
    with pytest.raises(CheckpointMismatchError, match=f"Delete the stage directory {tmp_path}"):
        make_trainer(str(tmp_path), num_steps=4, dim=DIM + 1).run()


def test_batch_not_divisible_by_mesh_is_a_clear_error():
    tr = make_trainer(None, mesh=meshlib.make_mesh(8))
    tr.batch_fn = lambda step: {"x": np.zeros((12, DIM), np.float32), "y": np.zeros((12, 3), np.float32)}
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        tr.step(tr.init_state(), 0)
