"""Drives bench/torch_reference.py in a child process (see its docstring): separate peak RSS
and thread pools, and the benchmark process never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

# Pause around each PyTorch measurement: either side's idle worker threads (OpenMP's,
# XLA:CPU's) may spin for a while after their work, which would bill the other side.
SETTLE_S = 0.1


def torch_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


class TorchReference:
    def __init__(self, kind: str, config: dict, extra):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
        self.proc = subprocess.Popen(
            [sys.executable, script, "--serve", kind, json.dumps(config), str(extra)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.banner = self._read()  # "ready torch <version> threads <n>" after its warm-up

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch reference exited (code {self.proc.wait()}) — see its error above")
        return line.strip()

    def ask(self, *cmd) -> str:
        self.proc.stdin.write(" ".join(str(c) for c in cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def time(self, op: str) -> float:
        time.sleep(SETTLE_S)
        seconds = float(self.ask(op))
        time.sleep(SETTLE_S)
        return seconds

    def peak_rss_mb(self) -> float:
        return float(self.ask("rss"))

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait(timeout=60)


def cpu_model() -> str:
    """lscpu's model name (from /proc/cpuinfo), e.g. 'AMD EPYC' or 'Intel(R) Xeon(R) ...'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"
