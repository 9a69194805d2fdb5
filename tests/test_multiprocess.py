"""True multi-process runs on this host: launch/local_multiprocess.sh starts 2 processes × 4
CPU devices joined by jax.distributed (the pod start-up of softdimo_jax.runtime.distributed);
tests/multiprocess_worker.py runs the smoke config's distillation, GAN and reward phases
through the Trainer. Compared with 1 process × 8 devices: the same losses and parameters to
round-off, checkpoints that restore exactly across process counts (2 → 1, 1 → 2), disjoint
per-process data shards that make up the 1-process batch, process-0-only writers, FID
features extracted over 2 processes equal to 1. Then a `kill -9` of one process mid-run (the
other stopped, as a pod's are), a restart of both that a SIGTERM preempts (every process saves
the current step, exit 0), and a last restart: the end state is bit-identical to the
uninterrupted 2-process run's.

Five launches in all (each pays start-up and compiles): the 2-process phases run; one
1-process run that trains and restores the 2-process checkpoints; the 2-process run that
restores the 1-process checkpoints and is then killed; two restarts. The step programs are
compiled with LLVM's cheap settings (EXTRA_XLA_FLAGS) and kept in a persistent compilation
cache shared by the launches; both sides of each comparison use the same flags."""

import glob
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = "tests/multiprocess_worker.py"
CHEAP_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
DISTILL_STEPS = 6  # the kill/restart chain runs the same distillation as the phases runs
pytestmark = pytest.mark.multiprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def base_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTDIMO_") and k != "XLA_FLAGS"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", **extra)
    if CACHE_DIR:  # launches with the same process count share their compiled programs
        env.update(JAX_COMPILATION_CACHE_DIR=CACHE_DIR[0], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


CACHE_DIR: list[str] = []  # set by the `runs` fixture


def launch(num_processes: int, args, log_dir, *, wait=True):
    """launch/local_multiprocess.sh running the worker in `num_processes` × (8 / n) devices."""
    env = base_env(ENTRY=WORKER, PYTHON=sys.executable, NUM_PROCESSES=str(num_processes),
                   DEVICES_PER_PROCESS=str(8 // num_processes), PORT=str(free_port()),
                   EXTRA_XLA_FLAGS=CHEAP_XLA, LOG_DIR=str(log_dir))
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=900)
    logs = "\n".join(pathlib.Path(p).read_text()[-3000:] for p in sorted(glob.glob(f"{log_dir}/*.log")))
    assert proc.returncode == 0, out + logs
    return proc


def single(args, log_dir):
    """The same worker as one ordinary (non-distributed) process over 8 CPU devices."""
    env = base_env(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {CHEAP_XLA}")
    r = subprocess.run([sys.executable, WORKER, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]


def states(npz):
    return {k: npz[k] for k in npz.files if "/state" in k}


@pytest.fixture(scope="module")
def data(tmp_path_factory, fixtures_dir):
    from test_tfds_images import TinyImagesArrayRecord

    d = tmp_path_factory.mktemp("mp_data")
    TinyImagesArrayRecord(data_dir=str(d / "tfds"), file_format="array_record").download_and_prepare()
    (d / "prompts.txt").write_text("".join(f"caption number {i}\n" for i in range(11)))
    return ["--tfds_dir", str(d / "tfds"), "--prompt_file", str(d / "prompts.txt"),
            "--fid_fixture", str(fixtures_dir / "inception_a.npz")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """The uninterrupted runs: 2 processes train the phases (two/w); then 1 process trains
    them (one/w) and, in the same launch, restores the 2-process checkpoints (2 → 1)."""
    root = tmp_path_factory.mktemp("mp")
    CACHE_DIR[:] = [str(root / "jax_cache")]
    one, two = root / "one", root / "two"
    steps = ["--distill_steps", str(DISTILL_STEPS)]
    launch(2, ["--workdir", str(two / "w"), "--out", str(two / "o"), *steps, *data], two / "logs")
    single(["--workdir", str(one / "w"), "--out", str(one / "o"), *steps, *data,
            "--restore_workdir", str(two / "w"), "--restore_out", str(two / "restored1")], one)
    yield root
    CACHE_DIR.clear()


def test_two_processes_equal_one_and_checkpoints_restore_on_one(runs):
    one, two = runs / "one", runs / "two"
    a, b = np.load(one / "o" / "phases.npz"), np.load(two / "o" / "phases.npz")

    # Distillation, GAN and reward steps: the same losses and parameters to round-off.
    assert set(a.files) == set(b.files)
    for phase, n in (("distill", DISTILL_STEPS), ("gan", 3), ("reward", 3)):
        assert len(a[f"{phase}/losses"]) == n
        np.testing.assert_allclose(b[f"{phase}/losses"], a[f"{phase}/losses"], rtol=1e-5, err_msg=phase)
    sa, sb = states(a), states(b)
    assert len(sa) > 300
    for k in sa:
        np.testing.assert_allclose(sb[k], sa[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert a["reward/losses"][0] != a["gan/losses"][0]  # three different phases ran

    # FID feature extraction: each process feeds its own images; the gathered features are
    # the 1-process ones (12 images, the last batch padded on both processes).
    for k in ("fid/2048", "fid/logits_unbiased"):
        assert a[k].shape[0] == 12
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-4, err_msg=k)
    assert np.std(a["fid/2048"], axis=0).max() > 1e-3

    # Per-process data: disjoint shards whose concatenation is the 1-process global batch.
    s1 = json.loads((one / "o" / "shards_0.json").read_text())
    p0, p1 = (json.loads((two / "o" / f"shards_{i}.json").read_text()) for i in (0, 1))
    assert (p0["processes"], p0["local_devices"], p0["devices"]) == (2, 4, 8) and p1["process"] == 1
    for step, rows in s1["gan_rows"].items():
        assert not set(p0["gan_rows"][step]) & set(p1["gan_rows"][step])
        assert p0["gan_rows"][step] + p1["gan_rows"][step] == rows
    for step, batch in s1["tfds"].items():  # the array_record path
        for key in ("label", "sum"):
            assert p0["tfds"][step][key] + p1["tfds"][step][key] == batch[key]
    assert not set(p0["prompts"]) & set(p1["prompts"])
    assert sorted(p0["prompts"] + p1["prompts"]) == sorted(s1["prompts"]) and len(s1["prompts"]) == 11

    # Only process 0 writes grids, metrics.json and TensorBoard.
    assert (two / "o" / "writers_0" / "grid.png").exists() and (two / "o" / "writers_0" / "metrics.json").exists()
    assert not (two / "o" / "writers_1").exists()
    events = glob.glob(str(two / "w" / "*" / "tb" / "events.out.tfevents.*"))
    assert len(events) == 3 and all(f".{p0['pid']}." in os.path.basename(e) for e in events)

    # Checkpoints written by 2 processes restore exactly in 1 (1 → 2: the kill test's launch).
    assert_restored(two / "restored1", sb)


def assert_restored(restored_dir, src: dict) -> None:
    r = np.load(restored_dir / "phases.npz")
    assert all(r[f"{p}/losses"].size == 0 for p in ("distill", "gan", "reward"))  # restored, not trained
    rs = states(r)
    assert set(rs) == set(src)
    for k in src:
        np.testing.assert_array_equal(rs[k], src[k], err_msg=k)


def _wait_for(pred, timeout, what, proc=None):
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}: {proc.stdout.read()}")
        if time.time() - t0 > timeout:
            if proc is not None:
                proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def progress(out, i) -> list[int]:
    f = out / f"progress_{i}"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def finalized(ckpt_dir) -> list[int]:
    """Checkpoint steps orbax has committed (a save in flight is a `<step>.orbax-checkpoint-tmp` directory)."""
    return sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()) if ckpt_dir.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill9_then_restart_resumes_exactly_and_sigterm_saves_every_process(runs):
    w, k = runs / "kill" / "w", runs / "kill"
    ckpts, lock = w / "distill" / "checkpoints", w / ".softdimo.lock"
    distill = ["--mode", "distill", "--workdir", str(w), "--distill_steps", str(DISTILL_STEPS)]

    # 1. Two processes (which first restore the 1-process checkpoints: 1 → 2) distil, a step
    #    every ~0.4 s; after a checkpoint is committed, process 1 gets SIGKILL mid-run. The
    #    launcher then stops process 0 (SIGKILL), as a pod's scheduler would.
    o1 = k / "o1"
    proc = launch(2, [*distill, "--out", str(o1), "--step_sleep", "0.4", "--restore_workdir", str(runs / "one" / "w"),
                      "--restore_out", str(runs / "one" / "restored2")], k / "logs1", wait=False)
    _wait_for(lambda: finalized(ckpts) and progress(o1, 1) and progress(o1, 1)[-1] > finalized(ckpts)[0],
              600, "a committed checkpoint and a step after it", proc)
    pids = [int((o1 / f"pid_{i}").read_text()) for i in (0, 1)]
    os.kill(pids[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    # Usually the launcher sees process 1's SIGKILL (137) first; on a loaded host process 0 can
    # notice the dead peer (a gloo connection reset) and exit with an error before that.
    assert proc.returncode != 0 and "stopping the others" in output, output
    assert not alive(pids[0]) and not alive(pids[1])
    killed_at = max(progress(o1, 0)[-1], progress(o1, 1)[-1])
    assert killed_at < DISTILL_STEPS  # it was mid-run
    committed = finalized(ckpts)
    assert committed and max(committed) <= killed_at
    # The lock of the killed run is still there, naming process 0, which is gone. (If process 0
    # noticed the dead peer and exited by itself before the launcher's SIGKILL reached it, it
    # released the lock, as it should: then plant the lock a process 0 killed first leaves.)
    if lock.exists():
        assert json.loads(lock.read_text())["pid"] == pids[0]
    else:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pids[0], "started": "killed run"}))
    # A save cut off by a kill leaves orbax's temporary directory: make one for the next
    # step, with half of the committed checkpoint's files, which must never be restored.
    partial = ckpts / f"{max(committed) + 1}.orbax-checkpoint-tmp"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(ckpts / str(max(committed)), partial)
    files = sorted(p for p in partial.rglob("*") if p.is_file())
    for p in files[::2]:
        p.unlink()

    # The 1-process checkpoints restored exactly in 2 processes (before the kill).
    assert_restored(runs / "one" / "restored2", states(np.load(runs / "one" / "o" / "phases.npz")))

    # 2. Restart both: the stale lock is taken over, the run resumes from the last committed
    #    step; a SIGTERM (a preempted VM) makes every process save the current step, exit 0.
    o2 = k / "o2"
    proc = launch(2, [*distill, "--out", str(o2), "--step_sleep", "0.4"], k / "logs2", wait=False)
    _wait_for(lambda: min(len(progress(o2, 0)), len(progress(o2, 1))) >= 2, 600, "two steps on both processes",
              proc)
    proc.send_signal(signal.SIGTERM)  # forwarded to both processes
    output, _ = proc.communicate(timeout=300)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((k / "logs2").glob("*.log")))
    assert proc.returncode == 0, output + logs
    assert progress(o2, 0)[0] == progress(o2, 1)[0] == max(committed) + 1  # resumed, not from the partial save
    assert "taking over the lock of a run that is gone" in logs and not lock.exists()
    saved = [json.loads((o2 / f"preempted_{i}.json").read_text()) for i in (0, 1)]
    assert saved[0] == saved[1] and saved[0]["stage"] == "distill"
    step = saved[0]["step"]
    assert step == progress(o2, 0)[-1] == progress(o2, 1)[-1] < DISTILL_STEPS  # no step ran after the save
    assert step in finalized(ckpts)

    # 3. Restart again, to the end: the final state and the losses are bit-identical to the
    #    uninterrupted 2-process run's.
    o3 = k / "o3"
    launch(2, [*distill, "--out", str(o3)], k / "logs3")
    r = np.load(o3 / "distill.npz")
    assert int(r["resumed_from"]) == step and list(r["loss_steps"]) == list(range(step + 1, DISTILL_STEPS + 1))
    ref = np.load(runs / "two" / "o" / "phases.npz")
    np.testing.assert_array_equal(r["losses"], ref["distill/losses"][step:])
    rs, refs = states(r), {key: v for key, v in states(ref).items() if key.startswith("distill/")}
    assert set(rs) == set(refs) and len(rs) > 100
    for key in refs:
        np.testing.assert_array_equal(rs[key], refs[key], err_msg=key)
    assert not list(ckpts.glob("*.orbax-checkpoint-tmp*")) and not lock.exists()
