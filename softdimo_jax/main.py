"""The one training command: distributed initialisation, then the pipeline the config names.

    python -m softdimo_jax.main --workdir=/tmp/digits                      # configs/digits.py
    python -m softdimo_jax.main --config=configs/digits.py:smoke --workdir=/tmp/smoke
    python -m softdimo_jax.main --workdir=DIR --config.teacher.train.num_steps=5000
    python -m softdimo_jax.main --config=configs/maskbit_imagenet256_distill.py \\
        --workdir=gs://BUCKET/run --config.teacher_checkpoint=gs://BUCKET/ckpt/gen14

`config.pipeline` picks the pipeline (softdimo_jax.pipelines.registry.PIPELINES): digits, teacher,
distill, gan, reward. With SOFTDIMO_DISTRIBUTED=1 (set by launch/tpu_train.sh and
launch/gpu_train.sh) `jax.distributed.initialize()` runs first on every host.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from softdimo_jax.pipelines.registry import PIPELINES
from softdimo_jax.runtime.checkpointing import CheckpointMismatchError
from softdimo_jax.runtime.distributed import Preempted, run_absl
from softdimo_jax.runtime.trainer import NonFiniteLossError

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.py"

_CONFIG = None
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, summaries, metrics.json (local or gs://)")


def _clean_message(e: BaseException) -> str:
    msg = str(e.args[0]) if e.args else str(e)
    return " ".join(msg.replace("\\n", " ").replace("\\", "").replace("'", "").split())


def define_config_flag():
    """Defines --config. ml_collections applies `--config.a.b=v` overrides while the flag is
    defined, and a locked config rejects unknown keys there: turn that into a short error."""
    global _CONFIG
    try:
        _CONFIG = config_flags.DEFINE_config_file(
            "config", str(DEFAULT_CONFIG),
            "ml_collections config file (default: configs/digits.py); append ':PRESET' for a "
            "preset (digits: ':smoke', the tiny one)",
            lock_config=True,
        )
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        overrides = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
        sys.exit(
            f"error: bad config override {' '.join(overrides)}: {_clean_message(e)}\n"
            "  (keys are locked; see the config file for the valid ones)"
        )


def pipeline_of(config):
    name = config.get("pipeline")
    if name not in PIPELINES:
        raise app.UsageError(
            f"config.pipeline is {name!r}; it must name one of {sorted(PIPELINES)} (set it in the config file)")
    return PIPELINES[name]


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (where checkpoints and metrics.json go)")
    # Orbax logs every save at INFO; keep the console to our progress lines and warnings.
    logging.set_verbosity(logging.WARNING)
    run = pipeline_of(_CONFIG.value)
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except (CheckpointMismatchError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:  # SIGTERM: the state is saved; exit 0 so the scheduler reruns us
        print(f"main: {e}", file=sys.stderr)
        return 0
    return 0


def run() -> None:
    if not DEFAULT_CONFIG.exists() and not any(a.startswith("--config") for a in sys.argv):
        sys.exit(f"error: the default config {DEFAULT_CONFIG} is missing; pass --config=PATH")
    define_config_flag()
    run_absl(main)


if __name__ == "__main__":
    run()
