"""The main command: the whole pipeline on the embedded digits default.

    python -m softdimo_jax.main --workdir=/tmp/digits
    python -m softdimo_jax.main --config=configs/digits.py --workdir=/tmp/digits
    python -m softdimo_jax.main --config=configs/digits.py:smoke --workdir=/tmp/smoke
    python -m softdimo_jax.main --workdir=DIR --config.teacher.train.num_steps=5000

Stages are cached in the workdir (rerun to resume or to skip finished stages); results go
to <workdir>/metrics.json and a table is printed at the end. See softdimo_jax/train.py.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.py"

_CONFIG = None
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, summaries, metrics.json")


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
            "ml_collections config file (default: configs/digits.py); append ':smoke' for the "
            "tiny preset",
            lock_config=True,
        )
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        overrides = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
        sys.exit(
            f"error: bad config override {' '.join(overrides)}: {_clean_message(e)}\n"
            "  (keys are locked; see the config file for the valid ones)"
        )


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (where checkpoints and metrics.json go)")
    # Orbax logs every save at INFO; keep the console to our progress lines and warnings.
    logging.set_verbosity(logging.WARNING)
    from softdimo_jax import train
    from softdimo_jax.training.checkpointing import CheckpointMismatchError
    from softdimo_jax.training.trainer import NonFiniteLossError

    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (CheckpointMismatchError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not DEFAULT_CONFIG.exists() and not any(a.startswith("--config") for a in sys.argv):
        sys.exit(f"error: the default config {DEFAULT_CONFIG} is missing; pass --config=PATH")
    # On TPU pods (launch/tpu_train.sh sets SOFTDIMO_DISTRIBUTED=1): one process per host.
    from softdimo_jax.training.distill_stage import maybe_initialize_distributed

    maybe_initialize_distributed()
    define_config_flag()
    app.run(main)


if __name__ == "__main__":
    run()
