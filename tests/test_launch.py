"""Launch scripts: valid bash, and DRY_RUN=1 prints the commands they would run."""

import os
import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


def _run(script, env, *args):
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("script", ["tpu_train.sh", "gpu_train.sh"])
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_tpu_dry_run_prints_every_worker_command():
    r = _run("tpu_train.sh", {"TPU_NAME": "dimo", "ZONE": "us-central2-b", "WORKDIR": "gs://bkt/run",
                              "CREATE": "1", "ACCELERATOR_TYPE": "v4-16"},
             "--config.distill.lr=5e-7", "--config.teacher_checkpoint=gs://bkt/gen 14")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("+ ")]
    assert any("gcloud compute tpus tpu-vm create dimo" in l and "v4-16" in l for l in lines)
    train = [l for l in lines if "tpu-vm ssh" in l and "softdimo_jax.main" in l]
    assert len(train) == 1
    argv = shlex.split(train[0][2:])  # what the local shell runs
    assert "--worker=all" in argv
    remote = shlex.split(argv[argv.index("--command") + 1])  # what each worker's shell runs
    assert "SOFTDIMO_DISTRIBUTED=1" in remote
    assert "--workdir=gs://bkt/run" in remote and "--config.distill.lr=5e-7" in remote
    assert "--config=configs/maskbit_imagenet256_distill.py" in remote
    # An override with a space survives both shells as one argument.
    assert "--config.teacher_checkpoint=gs://bkt/gen 14" in remote
    assert "tpu-vm scp" in r.stdout
    assert any("pip" in l and "jax" in l and "tpu" in l and "0.10.2" in l for l in lines)


def test_tpu_requires_gs_workdir_and_names():
    r = _run("tpu_train.sh", {"TPU_NAME": "dimo", "ZONE": "z", "WORKDIR": "/local/dir"})
    assert r.returncode != 0 and "gs://" in r.stderr
    r = _run("tpu_train.sh", {"ZONE": "z", "WORKDIR": "gs://b/r"})
    assert r.returncode != 0 and "TPU_NAME" in r.stderr


def test_gpu_dry_run_single_and_multi_host():
    r = _run("gpu_train.sh", {"WORKDIR": "/tmp/run", "NUM_GPUS": "2"}, "--config.distill.fsdp=2")
    assert r.returncode == 0, r.stderr
    assert "CUDA_VISIBLE_DEVICES=0\\,1" in r.stdout or "CUDA_VISIBLE_DEVICES=0,1" in r.stdout
    assert "-m softdimo_jax.main" in r.stdout and "--config.distill.fsdp=2" in r.stdout
    assert "SOFTDIMO_DISTRIBUTED" not in r.stdout
    r = _run("gpu_train.sh", {"WORKDIR": "/tmp/run", "NUM_PROCESSES": "2", "PROCESS_ID": "1",
                              "COORDINATOR": "10.0.0.1:1234"})
    assert r.returncode == 0, r.stderr
    for want in ("SOFTDIMO_DISTRIBUTED=1", "SOFTDIMO_PROCESS_ID=1", "SOFTDIMO_NUM_PROCESSES=2", "10.0.0.1:1234"):
        assert want in r.stdout
    r = _run("gpu_train.sh", {"WORKDIR": "/tmp/run", "NUM_PROCESSES": "2"})
    assert r.returncode != 0 and "PROCESS_ID" in r.stderr


def _argv_after_env(line):
    """The `python -m softdimo_jax.main ...` part and the SOFTDIMO_* settings of a command."""
    argv = shlex.split(line)
    i = next(k for k, a in enumerate(argv) if a == "-m")
    env = dict(a.split("=", 1) for a in argv[:i] if a.startswith("SOFTDIMO_"))
    return argv[i:], env


def test_pod_scripts_print_the_command_the_local_multiprocess_mode_runs():
    """tpu_train.sh and gpu_train.sh (DRY_RUN) run, on every host, exactly the entry, flags and
    jax.distributed start-up that launch/local_multiprocess.sh runs for real in the tests
    (tests/test_multiprocess.py); only how the coordinator is found differs."""
    args = ["--config=configs/maskbit_imagenet256_distill.py", "--workdir=gs://bkt/run", "--config.distill.fsdp=4"]
    r = _run("local_multiprocess.sh", {"NUM_PROCESSES": "2", "PORT": "5555"}, *args)
    assert r.returncode == 0, r.stderr
    local = [_argv_after_env(l.split("&&", 1)[1]) for l in r.stdout.splitlines() if l.startswith("+ ")]
    assert len(local) == 2
    assert [e["SOFTDIMO_PROCESS_ID"] for _, e in local] == ["0", "1"]
    assert all(e["SOFTDIMO_COORDINATOR"] == "localhost:5555" and e["SOFTDIMO_NUM_PROCESSES"] == "2"
               for _, e in local)
    entry = local[0][0]
    assert entry == ["-m", "softdimo_jax.main", *args]

    r = _run("gpu_train.sh", {"WORKDIR": "gs://bkt/run", "NUM_PROCESSES": "2", "PROCESS_ID": "1",
                              "COORDINATOR": "10.0.0.1:1234", "CONFIG": "configs/maskbit_imagenet256_distill.py"},
             "--config.distill.fsdp=4")
    gpu, env = _argv_after_env(r.stdout.split("&&", 1)[1])
    assert gpu == entry
    assert {k: env[k] for k in local[1][1] if k != "SOFTDIMO_COORDINATOR"} == {
        k: v for k, v in local[1][1].items() if k != "SOFTDIMO_COORDINATOR"}

    r = _run("tpu_train.sh", {"TPU_NAME": "dimo", "ZONE": "z", "WORKDIR": "gs://bkt/run", "SYNC": "0",
                              "SETUP": "0"}, "--config.distill.fsdp=4")
    (line,) = [l for l in r.stdout.splitlines() if "softdimo_jax.main" in l]
    argv = shlex.split(line[2:])
    remote = argv[argv.index("--command") + 1].split("&&", 1)[1]
    tpu, env = _argv_after_env(remote)
    assert tpu == entry
    assert env == {"SOFTDIMO_DISTRIBUTED": "1"}  # Cloud TPU finds the coordinator itself
