"""The one training command: distributed initialisation, then the pipeline the config names.

    python -m softdimo_jax.main --workdir=/tmp/digits                      # configs/digits.py
    python -m softdimo_jax.main --config=configs/digits.py:smoke --workdir=/tmp/smoke
    python -m softdimo_jax.main --workdir=DIR --config.teacher.train.num_steps=5000
    python -m softdimo_jax.main --config=configs/maskbit_imagenet256_distill.py \\
        --workdir=gs://BUCKET/run --config.teacher_checkpoint=gs://BUCKET/ckpt/gen14

`config.pipeline` picks the pipeline (softdimo_jax.pipelines.registry.PIPELINES): digits, teacher,
distill, gan, reward. With SOFTDIMO_DISTRIBUTED=1 (set by launch/tpu_train.sh and
launch/gpu_train.sh) `jax.distributed.initialize()` runs first on every host.

`--config=configs/X.py` works from any directory: a relative path that does not exist
from the current directory is looked up in this repository (its `configs/`), and the file
used is printed. Errors of ours are one line (`main: <what> — <fix>`, exit 2 for bad
input, 1 for a failed run); `--debug` shows the traceback. One run at a time per workdir
(a lock file, `.softdimo.lock`; a lock left by a killed run on this host is taken over).
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from softdimo_jax.pipelines.registry import PIPELINES
from softdimo_jax.runtime import checkpointing
from softdimo_jax.runtime.artifacts import is_remote
from softdimo_jax.runtime.config_files import REPO, config_error, parse_flags, rewrite_config_arg
from softdimo_jax.runtime.distributed import Preempted, run_absl
from softdimo_jax.runtime.errors import BadInput, define_debug_flag, guarded
from softdimo_jax.runtime.workdir_lock import workdir_lock

DEFAULT_CONFIG = REPO / "configs" / "digits.py"

_CONFIG = None
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, summaries, metrics.json (local or gs://)")
define_debug_flag()
flags.DEFINE_bool("retrain_stale", False, "retrain a stage whose checkpoint was made with other settings (or "
                  "from other upstream stages) and the stages after it, instead of refusing")


def define_config_flag():
    """Defines --config (a locked ml_collections config: unknown keys are refused).
    ml_collections may apply `--config.a.b=v` overrides right here (default config)."""
    global _CONFIG
    try:
        _CONFIG = config_flags.DEFINE_config_file(
            "config", str(DEFAULT_CONFIG),
            "ml_collections config file (default: configs/digits.py; a relative path is also looked "
            "up in the repository); append ':PRESET' for a preset (digits: ':smoke', the tiny one)",
            lock_config=True,
        )
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        raise config_error(e, sys.argv) from e


def _walk(config, prefix=""):
    for k, v in config.items():
        if hasattr(v, "items"):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", k, v


def validate_config(config) -> None:
    """Refuses settings that could only fail later with a traceback."""
    for path, key, value in _walk(config):
        if key in ("num_steps", "batch_size") and isinstance(value, int) and not isinstance(value, bool) \
                and value <= 0:
            raise BadInput(f"config.{path}={value}: must be a positive integer — pass "
                           f"--config.{path}=N with N >= 1")


def prepare_workdir(workdir: str) -> None:
    if is_remote(workdir):
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise BadInput(f"--workdir {workdir} is a file — pass a directory (it is created if missing)")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise BadInput(f"--workdir {workdir} is not writable ({e.strerror}) — pass a directory you "
                       "can write to") from e


def pipeline_of(config):
    name = config.get("pipeline")
    if name not in PIPELINES:
        raise BadInput(
            f"config.pipeline is {name!r} — it must name one of {sorted(PIPELINES)} (set it in the config file)")
    return PIPELINES[name]


def body(argv) -> int:
    if len(argv) > 1:
        raise BadInput(f"unexpected arguments: {' '.join(argv[1:])} — flags look like --name=value")
    if not _WORKDIR.value:
        raise BadInput("--workdir is required — pass where checkpoints and metrics.json go")
    # Orbax logs every save at INFO; keep the console to our progress lines and warnings.
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    validate_config(config)
    run = pipeline_of(config)
    prepare_workdir(_WORKDIR.value)
    checkpointing.RETRAIN_STALE["enabled"] = bool(flags.FLAGS.retrain_stale)
    with workdir_lock(_WORKDIR.value):
        try:
            run(config, _WORKDIR.value)
        except Preempted as e:  # SIGTERM: the state is saved; exit 0 so the scheduler reruns us
            print(f"main: {e}", file=sys.stderr)
            return 0
    return 0


def main(argv) -> int:
    return guarded("main", lambda: body(argv), debug=flags.FLAGS.debug)


def run() -> None:
    remaining: list[str] = []

    def start() -> int:
        argv = rewrite_config_arg(sys.argv, "main")
        if not DEFAULT_CONFIG.exists() and not any(a.startswith("--config") for a in argv):
            raise BadInput(f"the default config {DEFAULT_CONFIG} is missing — pass --config=PATH")
        sys.argv[:] = argv
        define_config_flag()
        remaining.extend(parse_flags(argv))
        return 0

    rc = guarded("main", start, debug="--debug" in sys.argv)
    if rc:
        sys.exit(rc)
    # The flags are parsed (once: config overrides define flags); app.run takes the result.
    run_absl(main, flags_parser=lambda argv: remaining)


if __name__ == "__main__":
    run()
