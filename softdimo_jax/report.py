"""Write the report of a finished (or partial) run: summary.png, fd_vs_steps.png, results.md
and the figures in TensorBoard (softdimo_jax.pipelines.report).

    python -m softdimo_jax.report /tmp/softdimo_digits

Errors are one line (`report: <what> — <fix>`); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from softdimo_jax.pipelines.report import write_report
from softdimo_jax.runtime.errors import BadInput, guarded, strip_debug


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m softdimo_jax.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="the --workdir of a run of python -m softdimo_jax.main (local)")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip the TensorBoard image summaries")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.workdir):
        raise BadInput(f"{args.workdir} is not a directory — pass the --workdir of a run")
    try:
        written = write_report(args.workdir, tensorboard=not args.no_tensorboard)
    except FileNotFoundError as e:
        raise BadInput(f"{' '.join(str(e).split())} — run python -m softdimo_jax.main on that workdir first") from e
    for path in written:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return guarded("report", lambda: run(strip_debug(argv)), debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
