"""Config files on the command line, shared by the commands that take `--config`
(main, aot): a relative path is also looked up in this repository, and a bad file or
override is one line (`BadInput`), not absl's traceback."""

from __future__ import annotations

import os
import pathlib
import runpy
import sys

from absl import app, flags

from softdimo_jax.runtime.errors import BadInput, one_line

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = "configs/digits.py"


def resolve_config_path(spec: str, cwd: str | None = None) -> tuple[str, bool]:
    """`path[:preset]` -> (spec with the file found, whether it was looked up in the repo).

    A relative path that does not exist from `cwd` is tried against the repository root
    (`configs/x.py`) and then its `configs/` directory (`x.py`)."""
    path, sep, preset = spec.partition(".py")
    path += ".py" if sep else ""
    rest = preset  # ":preset" or ""
    cwd = cwd or os.getcwd()
    if not path or os.path.isabs(path) or os.path.exists(os.path.join(cwd, path)):
        return spec, False
    for cand in (REPO / path, REPO / "configs" / path, REPO / "configs" / os.path.basename(path)):
        if cand.is_file():
            return str(cand) + rest, True
    raise BadInput(f"config file {path} not found (from {cwd} nor in {REPO / 'configs'}) — pass an "
                   f"existing file, e.g. --config={EXAMPLE_CONFIG}")


def rewrite_config_arg(argv: list[str], tool: str) -> list[str]:
    """argv with a --config path resolved (see `resolve_config_path`); says which file."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            spec, found = resolve_config_path(a.split("=", 1)[1])
            out[i] = "--config=" + spec
        elif a == "--config" and i + 1 < len(out):
            spec, found = resolve_config_path(out[i + 1])
            out[i + 1] = spec
        else:
            continue
        if found:
            print(f"{tool}: using config {spec}", file=sys.stderr)
    return out


def config_error(e: BaseException, argv: list[str]) -> BadInput:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    what = f"bad config override {' '.join(overrides)}" if overrides else "bad config"
    msg = one_line(e).replace("\\n", " ").replace("\\", "").replace("'", "").strip("\"")
    return BadInput(f"{what}: {msg} — keys are locked; see the config file for the valid ones")


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags now, so that a bad override or config file is one line, not absl's
    traceback; returns the arguments left over."""
    app.define_help_flags()  # --help / --helpfull (app.run defines them, but it parses after us)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise BadInput(f"{one_line(e)} — see --help for the flags") from e
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        raise config_error(e, argv) from e
    except (FileNotFoundError, OSError, SyntaxError) as e:
        raise BadInput(f"cannot load the config: {one_line(e)} — pass an existing config file") from e


def sibling_config_module(config_file: str, name: str) -> dict:
    """The namespace of configs/<name>.py beside `config_file` (configs build on each other:
    GAN on distillation, reward on GAN or distillation), e.g. `[...]["get_config"](preset)`."""
    return runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))
