"""Process start-up shared by every command: one distributed initialisation, one absl entry.

On TPU pods and GPU clusters (the launch scripts set SOFTDIMO_DISTRIBUTED=1) every host
runs the same command; `jax.distributed.initialize()` must run before anything touches the
devices, so `run_absl` does it first, then hands over to absl. The same start-up runs N
processes on one CPU host (`launch/local_multiprocess.sh`: fake CPU devices per process,
gloo collectives between them), which is how the tests check multi-host behaviour.

Preemption: Cloud TPU spot / preemptible VMs send SIGTERM. `PreemptionWatch` turns it into
"save a checkpoint at this step on every process, then stop": with several processes through
JAX's preemption sync service (all processes agree on the step), with one through a SIGTERM
handler.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import jax
from absl import app
from jax.experimental import multihost_utils


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
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # Cross-process collectives of the CPU backend (local multi-process runs, tests).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


class Preempted(Exception):
    """Raised by the Trainer after the preemption checkpoint is written; commands exit 0."""

    def __init__(self, stage: str, step: int, where: str | None):
        self.stage, self.step, self.where = stage, int(step), where
        super().__init__(f"[{stage}] preempted (SIGTERM): saved step {step} in {where}; rerun the same "
                         "command to resume")


class PreemptionWatch:
    """`with PreemptionWatch() as w: ... if w.requested(step): save and stop`.

    Several processes: JAX's preemption sync service (started by jax.distributed.initialize;
    it handles SIGTERM itself) makes `requested` true on every process at the same step. One
    process: a SIGTERM handler sets a flag (the main thread only; the previous handler comes
    back on exit)."""

    def __init__(self):
        self._flag = False
        self._previous = None
        self._sync = False

    def __enter__(self):
        return self.start()

    def start(self) -> "PreemptionWatch":
        # jax.distributed.initialize() starts the preemption sync service with the client.
        self._sync = jax.distributed.is_initialized()
        if not self._sync and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame):
        self._flag = True

    def requested(self, step: int) -> bool:
        if self._sync:
            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        return self._flag

    def stop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __exit__(self, *exc):
        self.stop()
        return False


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
