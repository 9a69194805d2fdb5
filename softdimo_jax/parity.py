"""Parity checker: runs a JAX port on a fixture made from the original PyTorch model.

    python -m softdimo_jax.parity FIXTURE.npz [FIXTURE.npz ...]

A fixture (SPEC §4) holds `model` (the family), `cfg` (JSON: the original's constructor
arguments), `sd/<key>` (weights in PyTorch layouts), `in/<name>` and `out/<name>`. The
family's check builds the matching JAX module from `cfg` alone, converts `sd/` with the
project's converter, runs it on `in/` and compares with `out/`. Exit status is non-zero
when any output misses its tolerance.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from typing import Any, Callable

import numpy as np

# family (the names of `python -m softdimo_jax.convert --model`) -> "module:function"; each
# function takes a Fixture and returns a list of Check.
FAMILIES: dict[str, str] = {
    "maskbit_generator": "softdimo_jax.parity_checks.maskbit:check_bert",
    "maskbit_tokenizer": "softdimo_jax.parity_checks.maskbit:check_tokenizer",
    "maskgen_vq": "softdimo_jax.parity_checks.maskgen:check_maskgen_vq",
    "tatitok": "softdimo_jax.parity_checks.maskgen:check_tatitok",
    "clip_text": "softdimo_jax.parity_checks.maskgen:check_clip_text",
    "maskgit_transformer": "softdimo_jax.parity_checks.maskgit:check_transformer",
    "taming_vqgan": "softdimo_jax.parity_checks.maskgit:check_vqgan",
    "fid_inception": "softdimo_jax.parity_checks.inception:check_inception",
    "blip": "softdimo_jax.parity_checks.blip:check_blip",
    "meissonic_transformer": "softdimo_jax.parity_checks.meissonic:check_transformer",
    "meissonic_vqvae": "softdimo_jax.parity_checks.meissonic:check_vqvae",
    "meissonic_text": "softdimo_jax.parity_checks.meissonic:check_text",
    "openclip": "softdimo_jax.parity_checks.clip:check_openclip",
    "hfclip": "softdimo_jax.parity_checks.clip:check_hfclip",
}

# Names the fixture files use for a family, where they differ from the convert names.
FIXTURE_NAMES = {"maskbit_bert": "maskbit_generator", "inception_fid": "fid_inception"}

# Max abs error allowed per kind of output (issue targets).
TOLERANCES: dict[str, float] = {
    "logits": 2e-4,
    "hidden": 2e-4,
    "image": 1e-4,
    "features": 5e-4,
    "ids": 0.0,
}


@dataclasses.dataclass
class Fixture:
    path: str
    model: str
    cfg: dict[str, Any]
    sd: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclasses.dataclass
class Check:
    name: str
    max_abs_err: float
    tol: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs_err)) and self.max_abs_err <= self.tol

    def line(self) -> str:
        status = "ok  " if self.passed else "FAIL"
        return f"  {status} {self.name:<40s} max_abs_err={self.max_abs_err:.3e}  tol={self.tol:.1e}"


def compare(name: str, got: Any, want: Any, kind: str) -> Check:
    """Max abs error between `got` and `want`; shape mismatch counts as an infinite error."""
    tol = TOLERANCES[kind]
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        print(f"  {name}: shape {got.shape} != reference {want.shape}", file=sys.stderr)
        return Check(name, float("inf"), tol)
    if kind == "ids":
        err = float(np.max(np.abs(got.astype(np.int64) - want.astype(np.int64)))) if got.size else 0.0
    else:
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        err = float(np.max(diff)) if diff.size else 0.0
        if not np.all(np.isfinite(got)):
            err = float("inf")
    return Check(name, err, tol)


def load_fixture(path: str) -> Fixture:
    with np.load(path, allow_pickle=False) as z:
        files = list(z.files)
        if "model" not in files or "cfg" not in files:
            raise ValueError(f"{path}: not a parity fixture (needs `model` and `cfg` entries)")
        model = str(z["model"])
        cfg = json.loads(str(z["cfg"]))
        group = lambda p: {k[len(p):]: np.asarray(z[k]) for k in files if k.startswith(p)}
        return Fixture(path, model, cfg, group("sd/"), group("in/"), group("out/"))


def family_check(model: str) -> Callable[[Fixture], list[Check]]:
    model = FIXTURE_NAMES.get(model, model)
    if model not in FAMILIES:
        raise ValueError(f"unknown fixture family {model!r}; known: {sorted(FAMILIES)}")
    mod_name, fn_name = FAMILIES[model].split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            raise NotImplementedError(f"family {model!r} has no JAX port yet ({mod_name})") from e
        raise
    return getattr(mod, fn_name)


def run_fixture(path: str) -> list[Check]:
    fx = load_fixture(path)
    return family_check(fx.model)(fx)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    failed = 0
    for path in argv:
        fx = load_fixture(path)
        print(f"{path} [{FIXTURE_NAMES.get(fx.model, fx.model)}]")
        try:
            checks = family_check(fx.model)(fx)
        except Exception as e:  # report and continue with the other fixtures
            print(f"  ERROR {type(e).__name__}: {e}")
            failed += 1
            continue
        for c in checks:
            print(c.line())
        failed += sum(not c.passed for c in checks)
    print("parity: " + ("all outputs within tolerance" if not failed else f"{failed} failure(s)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
