"""Faults while training: a diverged state is never saved or reported complete, a full disk
is one line, one run per workdir (stale locks taken over), and the main command's refusals
are one line (bad overrides, sizes, workdirs), with --config found from any directory."""

import errno
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.runtime import config_files
from softdimo_jax.runtime import checkpointing
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.errors import BadInput, RunFailure
from softdimo_jax.runtime.trainer import NonFiniteLossError, Trainer
from softdimo_jax.runtime.workdir_lock import LOCK_NAME, WorkdirBusyError, workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]


def blowup_trainer(stage_dir, explode_at=None, num_steps=4, scale=1e20):
    """Params are multiplied by `scale` from step `explode_at` on; the loss stays finite
    (it does not look at the params), as when a too-large learning rate explodes weights
    that the logged loss does not yet see."""

    def init_fn(rng):
        return {"w": jnp.ones((4,)), "step": jnp.zeros((), jnp.int32)}

    def step_fn(state, batch, rng, step, frozen):
        w = state["w"] * batch["scale"][0]
        return {"w": w, "step": state["step"] + 1}, {"loss": jnp.zeros(())}

    def batch_fn(step):
        bad = explode_at is not None and step >= explode_at
        return {"scale": np.full((1,), scale if bad else 1.0, np.float32)}

    return Trainer("blowup", stage_dir, init_fn, step_fn, batch_fn, num_steps=num_steps,
                   mesh=meshlib.make_mesh(1), checkpoint_every=2, log_every=1, async_checkpointing=False)


def test_exploding_state_is_never_saved(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"diverged by step 4.*last good checkpoint \(step 2\)") as e:
        blowup_trainer(str(tmp_path), explode_at=2).run()
    assert isinstance(e.value, RunFailure)
    tr = blowup_trainer(str(tmp_path))
    assert tr.latest_step() == 2
    # The kept checkpoint is one a sane rerun continues from, to completion.
    result = tr.run()
    assert result.resumed_from == 2 and result.step == 4
    np.testing.assert_array_equal(np.asarray(result.state["w"]), np.ones(4))


def test_nan_state_without_checkpoints_is_not_complete():
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        blowup_trainer(None, explode_at=3, scale=float("nan")).run()


def test_full_disk_while_saving_is_one_line(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "save", full)
    with pytest.raises(RunFailure, match=rf"no space left on the device of {tmp_path}.*MiB"):
        blowup_trainer(str(tmp_path)).run()


# ---------------------------------------------------------------- workdir lock
def test_second_run_is_refused_and_stale_lock_taken_over(tmp_path):
    with workdir_lock(str(tmp_path)) as path:
        assert os.path.exists(path)
        with open(path) as f:
            owner = json.load(f)
        # Another live process of this host holds it: refused in one line.
        with open(path, "w") as f:
            json.dump({**owner, "pid": os.getppid()}, f)
        with pytest.raises(WorkdirBusyError, match=f"pid {os.getppid()} on this host"):
            with workdir_lock(str(tmp_path)):
                pass
        # Its owner is gone (a killed run): taken over.
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        with open(path, "w") as f:
            json.dump({**owner, "pid": int(dead)}, f)
        with workdir_lock(str(tmp_path)) as again:
            assert json.load(open(again))["pid"] == os.getpid()
        assert not os.path.exists(path)
    # Another host cannot be checked: refused, with how to clear it.
    with open(tmp_path / LOCK_NAME, "w") as f:
        json.dump({"host": socket.gethostname() + "-other", "pid": 1, "started": "x"}, f)
    with pytest.raises(WorkdirBusyError, match="delete"):
        with workdir_lock(str(tmp_path)):
            pass


# ---------------------------------------------------------------- main: one line per refusal
def _main(args, cwd=REPO, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", "softdimo_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("main: ")]
    return proc.returncode, lines, proc.stderr


@pytest.mark.parametrize("args,expect", [
    (["--config.nonexistent=1"], "bad config override --config.nonexistent"),
    (["--config.teacher.train.batch_size=0"], "config.teacher.train.batch_size=0: must be a positive integer"),
    (["--config.tokenizer.train.num_steps=0"], "config.tokenizer.train.num_steps=0: must be a positive integer"),
    (["--config=configs/nope.py"], "config file configs/nope.py not found"),
    (["--workdir_is_a_file"], "is a file"),
    (["--workdir_locked"], "in use by another run"),
])
def test_main_refusals_are_one_line(tmp_path, args, expect):
    workdir = tmp_path / "wd"
    if args == ["--workdir_is_a_file"]:
        workdir.write_text("x")
        args = []
    elif args == ["--workdir_locked"]:
        workdir.mkdir()
        (workdir / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                     "started": "now"}))
        args = []
    cfg = [] if any(a.startswith("--config=") for a in args) else ["--config=configs/digits.py:smoke"]
    rc, lines, err = _main(cfg + args + [f"--workdir={workdir}"])
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and expect in lines[0] and " — " in lines[0], err[-3000:]
    assert "Traceback" not in err


def test_config_found_from_another_directory(tmp_path):
    """Run from a directory without configs/: the repository's file is used and named."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    spec, found = config_files.resolve_config_path("configs/digits.py:smoke", cwd=str(other))
    assert found and spec == str(REPO / "configs" / "digits.py") + ":smoke"
    spec, found = config_files.resolve_config_path("digits.py", cwd=str(other))
    assert found and spec == str(REPO / "configs" / "digits.py")
    (other / "configs").mkdir()
    (other / "configs" / "digits.py").write_text("")
    assert config_files.resolve_config_path("configs/digits.py", cwd=str(other)) == ("configs/digits.py", False)
    # End to end: parsing succeeds from elsewhere and refuses only the bad size, naming the file used.
    rc, lines, err = _main(["--config=configs/digits.py:smoke", "--config.teacher.train.batch_size=-1",
                            f"--workdir={tmp_path / 'wd'}"], cwd=str(tmp_path))
    assert rc == 2 and any("using config " + str(REPO / "configs" / "digits.py") in l for l in lines), err[-2000:]
    assert "batch_size=-1" in lines[-1]


def test_main_help_lists_the_flags():
    """--help is absl's usage (the flags are parsed before app.run, which defines it)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "softdimo_jax.main", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert "--workdir" in proc.stdout and "Unknown command line flag" not in proc.stdout + proc.stderr, \
        proc.stdout[-2000:] + proc.stderr[-2000:]


def test_main_debug_shows_traceback(tmp_path):
    rc, lines, err = _main(["--config=configs/digits.py:smoke", "--config.teacher.train.num_steps=0",
                            "--debug", f"--workdir={tmp_path}"])
    assert rc == 2 and "Traceback" in err and lines


# ---------------------------------------------------------------- stage identity
from softdimo_jax.runtime.checkpointing import RETRAIN_STALE, StaleStageError


def ident_trainer(stage_dir, num_steps=4, lr=0.1, upstream="u1"):
    tr = blowup_trainer(stage_dir, num_steps=num_steps)
    tr.config_json = {"config": {"train": {"lr": lr, "num_steps": num_steps}, "seed": 0},
                      "upstream": {"prev": {"config": {"x": upstream}}}}
    return tr


def test_changed_setting_is_refused_naming_the_directory(tmp_path):
    ident_trainer(str(tmp_path)).run()
    with pytest.raises(StaleStageError, match=rf"config.train.lr: 0.1 -> 0.2.*delete the stage directory {tmp_path}"):
        ident_trainer(str(tmp_path), lr=0.2).run()
    with pytest.raises(StaleStageError, match=r"upstream.prev.config.x: \"u1\" -> \"u2\""):
        ident_trainer(str(tmp_path), upstream="u2").run()
    with pytest.raises(StaleStageError, match=r"num_steps: 4 -> 2"):  # shorter: not the same run
        ident_trainer(str(tmp_path), num_steps=2).run()
    again = ident_trainer(str(tmp_path)).run()  # unchanged: restored
    assert not again.trained


def test_display_and_save_cadence_settings_are_not_identity(tmp_path):
    """grid_samples / log_every / ckpt_every shape what a run shows, not its state: a change
    of these alone restores the finished stage."""
    ident_trainer(str(tmp_path)).run()
    tr = ident_trainer(str(tmp_path))
    tr.config_json["config"].update(grid_samples=0, train={"lr": 0.1, "num_steps": 4, "log_every": 7})
    assert not tr.run().trained


def test_longer_num_steps_resumes_and_extends(tmp_path):
    ident_trainer(str(tmp_path)).run()
    longer = ident_trainer(str(tmp_path), num_steps=6).run()
    assert longer.trained and longer.resumed_from == 4 and longer.step == 6


def test_retrain_stale_retrains(tmp_path, monkeypatch):
    ident_trainer(str(tmp_path)).run()
    monkeypatch.setitem(RETRAIN_STALE, "enabled", True)
    result = ident_trainer(str(tmp_path), lr=0.2).run()
    assert result.trained and result.resumed_from is None
    monkeypatch.setitem(RETRAIN_STALE, "enabled", False)
    assert not ident_trainer(str(tmp_path), lr=0.2).run().trained  # the new identity is stored


def test_unfinished_stage_may_continue_with_its_own_changed_settings(tmp_path):
    """A diverged run stopped at its last good checkpoint continues with a saner setting."""
    tr = ident_trainer(str(tmp_path))
    tr.batch_fn = lambda step: {"scale": np.full((1,), 1e20 if step >= 2 else 1.0, np.float32)}
    with pytest.raises(NonFiniteLossError):
        tr.run()
    result = ident_trainer(str(tmp_path), lr=0.01).run()
    assert result.resumed_from == 2 and result.step == 4
    with pytest.raises(StaleStageError):  # an upstream change is never continued
        ident_trainer(str(tmp_path), lr=0.01, upstream="u2").run()


def test_prompt_file_refusals_name_file_and_offset(tmp_path):
    from softdimo_jax.data import prompts

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a cat\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(BadInput, match=rf"{bad}.*not UTF-8 \(byte 9: .*— save it as UTF-8"):
        prompts.read_prompts(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match=rf"{empty}.*no captions"):
        prompts.read_prompts(str(empty))
