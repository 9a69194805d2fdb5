"""True multi-process runs on this host: launch/local_multiprocess.sh starts 2 processes × 4
CPU devices joined by jax.distributed (the pod start-up of softdimo_jax.runtime.distributed);
tests/multiprocess_worker.py runs the smoke config's distillation, GAN and reward phases
through the Trainer. Compared with 1 process × 8 devices: the same losses and parameters to
round-off, checkpoints that restore exactly across process counts (2 → 1, 1 → 2), disjoint
per-process data shards that make up the 1-process batch, process-0-only writers, and a
SIGTERM that makes every process save the current step and exit 0, FID features extracted
over 2 processes equal to 1.

The step programs are compiled with LLVM's cheap settings (EXTRA_XLA_FLAGS) to keep these
runs short; both sides of each comparison use the same flags."""

import glob
import json
import os
import pathlib
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
pytestmark = pytest.mark.multiprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def base_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTDIMO_") and k != "XLA_FLAGS"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


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


def test_two_processes_equal_one_and_checkpoints_cross_process_counts(tmp_path, data):
    one, two = tmp_path / "one", tmp_path / "two"
    single(["--workdir", str(one / "w"), "--out", str(one / "o"), *data], one)
    launch(2, ["--workdir", str(two / "w"), "--out", str(two / "o"), *data], two / "logs")
    a, b = np.load(one / "o" / "phases.npz"), np.load(two / "o" / "phases.npz")

    # Distillation, GAN and reward steps: the same losses and parameters to round-off.
    assert set(a.files) == set(b.files)
    for phase, n in (("distill", 2), ("gan", 3), ("reward", 3)):
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

    # Checkpoints: 2 processes' restore exactly in 1 process, and 1 process's in 2.
    single(["--workdir", str(two / "w"), "--out", str(two / "restored1")], two / "r1")
    launch(2, ["--workdir", str(one / "w"), "--out", str(one / "restored2")], one / "logs_r2")
    for src, restored in ((sb, two / "restored1"), (sa, one / "restored2")):
        r = np.load(restored / "phases.npz")
        assert all(r[f"{p}/losses"].size == 0 for p in ("distill", "gan", "reward"))  # restored, not trained
        rs = states(r)
        assert set(rs) == set(src)
        for k in src:
            np.testing.assert_array_equal(rs[k], src[k], err_msg=k)


def _wait_for(pred, timeout, what):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_sigterm_saves_the_current_step_on_every_process_and_exits_0(tmp_path):
    out = tmp_path / "o"
    proc = launch(2, ["--workdir", str(tmp_path / "w"), "--out", str(out), "--mode", "long"], tmp_path / "logs",
                  wait=False)

    def steps(i):
        f = out / f"progress_{i}"
        return [int(x) for x in f.read_text().split()] if f.exists() else []

    try:
        _wait_for(lambda: min(len(steps(0)), len(steps(1))) >= 2, 600, "two steps on both processes")
    except AssertionError:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)  # forwarded to both processes, as a preempted VM gets it
    output, _ = proc.communicate(timeout=300)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, output + logs
    saved = [json.loads((out / f"preempted_{i}.json").read_text()) for i in (0, 1)]
    assert saved[0] == saved[1] and saved[0]["stage"] == "distill"
    step = saved[0]["step"]
    assert step >= 2 and step == steps(0)[-1] == steps(1)[-1]  # no step ran after the save
    ckpts = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "w" / "distill" / "checkpoints" / "*"))
                   if os.path.basename(p).isdigit())
    assert ckpts == [step]  # the preemption save (the regular cadence is 100000 steps)
