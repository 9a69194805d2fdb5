"""One run per workdir: a lock file that a killed run does not leave stuck.

`workdir_lock(workdir)` creates `<workdir>/.softdimo.lock` atomically (O_EXCL) holding
the owner's host, pid and start time, and removes it on exit. A second run finds the file
and is refused in one line naming the owner. A lock whose owner is on this host and no
longer alive (killed, crashed, out of memory) is stale: it is taken over with a warning.
A lock from another host cannot be checked; the message says how to clear it if that run
is gone. Only process 0 of a multi-process run takes the lock; remote (gs://) workdirs
are not locked (no atomic create there).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import jax

from softdimo_jax.runtime.artifacts import is_remote, log
from softdimo_jax.runtime.errors import BadInput

LOCK_NAME = ".softdimo.lock"


class WorkdirBusyError(BadInput):
    """Another run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(workdir: str) -> str:
    """Takes the lock (see the module docstring); returns the lock file's path."""
    path = os.path.join(workdir, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            host, pid = owner.get("host"), owner.get("pid")
            if host == me["host"] and isinstance(pid, int) and pid != me["pid"] and not _alive(pid):
                log(f"warning: taking over the lock of a run that is gone (pid {pid} on {host}): {path}")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            if not owner:  # being written right now, or unreadable: look again shortly
                time.sleep(0.2)
                owner = _read(path)
                if not owner:
                    raise WorkdirBusyError(f"{workdir} is locked by an unreadable {path} — if no run is "
                                           "using this workdir, delete that file")
                host, pid = owner.get("host"), owner.get("pid")
            where = "this host" if host == me["host"] else f"host {host}"
            raise WorkdirBusyError(
                f"{workdir} is in use by another run (pid {pid} on {where}, started {owner.get('started')}) — "
                f"wait for it, use another --workdir, or if that run is gone delete {path}")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise WorkdirBusyError(f"could not take the lock {path} — delete it if no run uses {workdir}")


def release(path: str) -> None:
    owner = _read(path)
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def workdir_lock(workdir: str):
    if is_remote(workdir) or jax.process_index() != 0:
        yield None
        return
    os.makedirs(workdir, exist_ok=True)
    path = acquire(workdir)
    try:
        yield path
    finally:
        release(path)
