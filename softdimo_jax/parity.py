"""Parity checker: runs a JAX port on a fixture made from the original PyTorch model.

    python -m softdimo_jax.parity FIXTURE.npz [FIXTURE.npz ...]

A fixture (SPEC §4) holds `model` (the family), `cfg` (JSON: the original's constructor
arguments), `sd/<key>` (weights in PyTorch layouts), `in/<name>` and `out/<name>`. The
family's check builds the matching JAX module from `cfg` alone, converts `sd/` with the
project's converter, runs it on `in/` and compares with `out/`.

Strict by design: every `out/` entry must be compared (an output the family does not know
is a failure, not a skip), every output the family requires must be present (a fixture may
name its own list in an `outputs` entry, a JSON list), and a fixture that compares nothing
fails. Exit status: 0 all within tolerance, 1 any failure, 2 a file that is not a fixture.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import zipfile
from typing import Any, Callable

import numpy as np

from softdimo_jax.conversion.state_dict import check_npz
from softdimo_jax.runtime.errors import BadInput, guarded, strip_debug

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

# The outputs a fixture of each family must carry (the full set the fixture makers write);
# a fixture may list its own in an `outputs` entry. Families not listed require only that
# something is compared.
REQUIRED_OUTPUTS: dict[str, tuple[str, ...]] = {
    "maskbit_generator": ("logits", "input_bits"),
    "maskbit_tokenizer": ("encoder_z", "indices", "decoded", "decoded_soft"),
    "maskgen_vq": ("logits",),
    "tatitok": ("encoder_z", "indices", "z_quantized", "reconstructed", "decoded", "soft_latents",
                "decoded_soft"),
    "clip_text": ("penultimate", "pooled", "text_guidance"),
    "maskgit_transformer": ("logits",),
    "taming_vqgan": ("encoder_h", "indices", "decoded", "soft_latents", "decoded_soft"),
    "blip": ("image_embeds", "text_last_hidden_state", "text_cls_feature", "mlp_raw", "reward"),
    "openclip": ("image_features", "text_features", "logits_per_image", "hps_score"),
    "hfclip": ("image_embeds", "text_embeds", "text_last_hidden_state", "logits_per_image", "pickscore"),
    "meissonic_transformer": ("logits", "cfg_logits", "dimo_perturb_logits"),
    "meissonic_vqvae": ("encoder_latents", "indices", "reconstructed", "decoded", "decoded_soft"),
    "meissonic_text": ("encoder_hidden_states", "text_embeds", "last_hidden_state"),
}

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
    # The outputs this fixture says it checks (its `outputs` entry), None: the family's.
    named_outputs: tuple[str, ...] | None = None


@dataclasses.dataclass
class Check:
    name: str
    max_abs_err: float
    tol: float
    problem: str | None = None  # a structural failure (missing / unchecked output)

    @property
    def passed(self) -> bool:
        return self.problem is None and bool(np.isfinite(self.max_abs_err)) and self.max_abs_err <= self.tol

    def line(self) -> str:
        if self.problem is not None:
            return f"  FAIL {self.name:<40s} {self.problem}"
        status = "ok  " if self.passed else "FAIL"
        return f"  {status} {self.name:<40s} max_abs_err={self.max_abs_err:.3e}  tol={self.tol:.1e}"


def audit(fx: Fixture, checks: list[Check]) -> list[Check]:
    """`checks` plus a failing Check for each required output that is absent, each output
    that no check compared, and for a fixture where nothing was compared at all."""
    family = FIXTURE_NAMES.get(fx.model, fx.model)
    required = fx.named_outputs if fx.named_outputs is not None else REQUIRED_OUTPUTS.get(family, ())
    compared = {c.name for c in checks}
    out = list(checks)
    for name in required:
        if name not in fx.outputs:
            out.append(Check(f"out/{name}", float("inf"), 0.0,
                             "missing from the fixture (the family requires it)"))
        elif name not in compared:
            out.append(Check(f"out/{name}", float("inf"), 0.0, "required but not compared"))
    for name in sorted(set(fx.outputs) - compared - set(required)):
        out.append(Check(f"out/{name}", float("inf"), 0.0,
                         f"not compared: the {family} check does not know this output"))
    if not checks:
        out.append(Check("(fixture)", float("inf"), 0.0, "no output was compared"))
    return out


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
    if not os.path.isfile(path):
        raise BadInput(f"{path}: no such fixture file — pass a parity fixture .npz (see tests/fixtures/)")
    try:
        check_npz(path)
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)
            if "model" not in files or "cfg" not in files:
                raise BadInput(f"{path}: not a parity fixture (needs `model` and `cfg` entries) — "
                               "pass a fixture made as SPEC §4 describes")
            model = str(z["model"])
            cfg = json.loads(str(z["cfg"]))
            named = json.loads(str(z["outputs"])) if "outputs" in files else None
            if named is not None and (not isinstance(named, list) or not all(isinstance(n, str) for n in named)):
                raise BadInput(f"{path}: the `outputs` entry must be a JSON list of output names — fix the fixture")
            group = lambda p: {k[len(p):]: np.asarray(z[k]) for k in files if k.startswith(p)}
            return Fixture(path, model, cfg, group("sd/"), group("in/"), group("out/"),
                           None if named is None else tuple(named))
    except BadInput:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise BadInput(f"{path}: not a readable .npz fixture ({type(e).__name__}: {e}) — "
                       "re-create or re-copy the fixture") from e


def family_check(model: str) -> Callable[[Fixture], list[Check]]:
    model = FIXTURE_NAMES.get(model, model)
    if model not in FAMILIES:
        raise BadInput(f"unknown fixture family {model!r} — the fixture's `model` must be one of {sorted(FAMILIES)}")
    mod_name, fn_name = FAMILIES[model].split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            raise NotImplementedError(f"family {model!r} has no JAX port yet ({mod_name})") from e
        raise
    return getattr(mod, fn_name)


def run_fixture(path: str) -> list[Check]:
    """Every check of the fixture at `path`, structural failures (see `audit`) included."""
    fx = load_fixture(path)
    return audit(fx, family_check(fx.model)(fx))


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        if not argv:
            raise BadInput("no fixture given — pass one or more fixture .npz files")
        return 0
    fixtures = [load_fixture(path) for path in argv]  # refuse a bad file before any work
    failed = 0
    for fx in fixtures:
        print(f"{fx.path} [{FIXTURE_NAMES.get(fx.model, fx.model)}]")
        try:
            checks = family_check(fx.model)(fx)
        except Exception as e:  # report and continue with the other fixtures
            print(f"  ERROR {type(e).__name__}: {' '.join(str(e).split())}")
            failed += 1
            continue
        checks = audit(fx, checks)
        for c in checks:
            print(c.line())
        failed += sum(not c.passed for c in checks)
    print("parity: " + ("all outputs within tolerance" if not failed else f"{failed} failure(s)"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return guarded("parity", lambda: run(strip_debug(argv)), debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
