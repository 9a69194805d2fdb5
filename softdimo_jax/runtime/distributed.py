"""Process start-up shared by every command: one distributed initialisation, one absl entry.

On TPU pods and GPU clusters (the launch scripts set SOFTDIMO_DISTRIBUTED=1) every host
runs the same command; `jax.distributed.initialize()` must run before anything touches the
devices, so `run_absl` does it first, then hands over to absl.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
from absl import app


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when SOFTDIMO_DISTRIBUTED=1 (multi-host pods / GPU
    clusters). On Cloud TPU the coordinator is discovered automatically; elsewhere set
    SOFTDIMO_COORDINATOR (host:port), SOFTDIMO_NUM_PROCESSES and SOFTDIMO_PROCESS_ID."""
    if os.environ.get("SOFTDIMO_DISTRIBUTED", "0") not in ("1", "true", "True"):
        return False
    kwargs = {}
    if os.environ.get("SOFTDIMO_COORDINATOR"):
        missing = [k for k in ("SOFTDIMO_NUM_PROCESSES", "SOFTDIMO_PROCESS_ID") if not os.environ.get(k)]
        if missing:
            raise SystemExit(f"error: SOFTDIMO_COORDINATOR is set but {', '.join(missing)} is not; "
                             "set all three (or none, on Cloud TPU)")
        kwargs = dict(
            coordinator_address=os.environ["SOFTDIMO_COORDINATOR"],
            num_processes=int(os.environ["SOFTDIMO_NUM_PROCESSES"]),
            process_id=int(os.environ["SOFTDIMO_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
    return True


def run_absl(main: Callable[[list[str]], int | None], flags_parser: Callable | None = None) -> None:
    """The entry of every absl command: quiet TensorFlow, distributed init, then app.run.
    Flags must be defined before this is called; `flags_parser` as in app.run (a command
    that parsed its flags already hands back the result)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    maybe_initialize_distributed()
    if flags_parser is None:
        app.run(main)
    else:
        app.run(main, flags_parser=flags_parser)
