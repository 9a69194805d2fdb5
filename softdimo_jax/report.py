"""Write the report of a finished (or partial) run: summary.png, fd_vs_steps.png, results.md
and the figures in TensorBoard (softdimo_jax.pipelines.report).

    python -m softdimo_jax.report /tmp/softdimo_digits
"""

from __future__ import annotations

import argparse
import sys

from softdimo_jax.pipelines.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softdimo_jax.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", help="the --workdir of a run of python -m softdimo_jax.main (local)")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip the TensorBoard image summaries")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.workdir, tensorboard=not args.no_tensorboard)
    except FileNotFoundError as e:
        print(f"report: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
