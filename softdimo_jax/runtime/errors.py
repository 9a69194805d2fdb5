"""The project's error types and the one-line refusal every command prints.

Every command (main, convert, parity, sample, evaluate, report, aot) runs its body through
`guarded(tool, body)`: an error of ours becomes one line on stderr,
`<tool>: <what> — <fix>`, and exit code 2 (bad input) or 1 (a failure while running);
`--debug` anywhere on the command line shows the traceback instead.

Raise `BadInput` for anything the user can fix by changing what they pass (a path, a flag,
a config key, a file's content) and `RunFailure` for a run that went wrong (non-finite
loss, full disk). Existing specific errors subclass one of them, so callers that catch
ValueError / RuntimeError keep working.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable

from absl import flags


class SoftDiMOError(Exception):
    """Base of the errors a command reports in one line."""

    exit_code = 1


class BadInput(SoftDiMOError, ValueError):
    """The input is wrong (file, flag, config key, content); the message says how to fix it."""

    exit_code = 2


class RunFailure(SoftDiMOError, RuntimeError):
    """The run itself failed (diverged, disk full, ...); the message says what to do."""

    exit_code = 1


def one_line(e: BaseException) -> str:
    """The error's message squeezed onto one line."""
    msg = str(e.args[0]) if len(e.args) == 1 else str(e)
    return " ".join(msg.split()) or type(e).__name__


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv


def define_debug_flag() -> None:
    """absl's --debug, defined once however many commands a process imports."""
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, "show the traceback of an error instead of one line")


def strip_debug(argv: list[str]) -> list[str]:
    """argv without the --debug switch (each command's own parser never sees it)."""
    return [a for a in argv if a != "--debug"]


def guarded(tool: str, body: Callable[[], int | None], *, debug: bool | None = None) -> int:
    """Runs `body`; an error of ours becomes `tool: message` on stderr and its exit code."""
    debug = debug_requested() if debug is None else debug
    try:
        return int(body() or 0)
    except SoftDiMOError as e:
        if debug:
            traceback.print_exc()
        print(f"{tool}: {one_line(e)}", file=sys.stderr)
        return e.exit_code
