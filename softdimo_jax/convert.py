"""Convert PyTorch checkpoints into orbax checkpoints of our Flax modules.

    python -m softdimo_jax.convert --model maskbit_generator --bits 14 \\
        maskbit_generator_14bit.bin ckpt/maskbit_generator_14bit
    python -m softdimo_jax.convert --model maskbit_tokenizer --bits 14 \\
        maskbit_tokenizer_14bit.bin ckpt/maskbit_tokenizer_14bit
    # other sizes / settings: --set depth=12 --set hidden_dim=768 (module field names)

SRC may be `.bin`/`.pth`/`.pt`/`.ckpt` (read without PyTorch by a restricted unpickler),
`.safetensors` or `.npz`. DST becomes a directory with `params/` (orbax, {'params': ...})
and `model.json` (family + module config); `softdimo_jax.runtime.converted` holds the family
table and `load_converted(DST)` -> (model, params).

`--set FIELD=VALUE` values are JSON (`depth=12`, `use_prenorm=true`, `ch_mult=[1,2,4]`,
`precision=null`); a bare word is taken as a string only for a string field
(`dtype=bfloat16`), and a comma list (`ch_mult=1,2,4`) only for a list field.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax
import numpy as np

from softdimo_jax.conversion.state_dict import ConversionError, load_state_dict
from softdimo_jax.runtime.converted import FAMILIES, check_replaceable, module_config, save_converted
from softdimo_jax.runtime.errors import BadInput, guarded, strip_debug

# ------------------------------------------------------------------ CLI


def family_fields(model_name: str, bits: int | None = None) -> dict[str, Any]:
    """Every module field of a family with its default (JSON values)."""
    fam = FAMILIES[model_name]
    return module_config(fam.build(fam.default_config(bits)))


def _parse_value(field: str, text: str, default: Any = None, *, known: bool = False) -> Any:
    """A `--set` value: JSON, checked against the type of the field's default."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if isinstance(default, list) and "," in text:
            try:  # ch_mult=1,2,4 -> [1, 2, 4] (unambiguous: the field is a list)
                return [json.loads(p) for p in text.split(",")]
            except json.JSONDecodeError:
                pass
        if isinstance(default, str) or (not known and "," not in text):
            return text
        hint = f"[{text}]" if "," in text else json.dumps(text)
        raise BadInput(f"--set {field}={text}: the value is not JSON — write it as JSON, e.g. "
                       f"--set '{field}={hint}'")
    if not known or default is None or value is None:
        return value
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), list: lambda v: isinstance(v, list)}.get(type(default))
    if ok is not None and not ok(value):
        raise BadInput(f"--set {field}={text}: expected a {type(default).__name__} like "
                       f"{json.dumps(default)}, got {json.dumps(value)} — pass a JSON {type(default).__name__}")
    return value


def parse_overrides(items, fields: dict[str, Any] | None = None) -> dict:
    """`FIELD=VALUE` strings -> {field: value}; with `fields` (name -> default), unknown names
    are refused and values are checked against the defaults' types."""
    out = {}
    for item in items or []:
        for part in item.split() if " " in item else [item]:
            if "=" not in part:
                raise BadInput(f"--set {part!r} must look like FIELD=VALUE (e.g. --set depth=12)")
            k, v = part.split("=", 1)
            k = k.strip().removeprefix("config.")
            if fields is not None and k not in fields:
                raise BadInput(f"--set {k}: no such field — fields: {', '.join(sorted(fields))}")
            out[k] = _parse_value(k, v.strip(), (fields or {}).get(k), known=fields is not None)
    return out


def convert(model_name: str, src: str, dst: str, *, bits: int | None = None, overrides: dict | None = None,
            subkey: str | None = None, overwrite: bool = False) -> tuple[Any, Any]:
    """Library form of the CLI: converts SRC into DST and returns (model, params)."""
    if model_name not in FAMILIES:
        raise BadInput(f"unknown --model {model_name!r} — use one of {sorted(FAMILIES)}")
    fam = FAMILIES[model_name]
    config = fam.default_config(bits)
    if os.path.isdir(src):  # diffusers-format folder: the architecture comes from its config.json
        folder_config, src = fam.read_folder(src)
        config.update(folder_config)
    unknown = sorted(set(overrides or {}) - set(module_config(fam.build(config))))
    if unknown:
        raise BadInput(f"unknown config fields {unknown} for {model_name} — fields: {sorted(config)}")
    config.update(overrides or {})
    try:
        model = fam.build(config)
    except (TypeError, ValueError) as e:
        raise BadInput(f"cannot build {model_name} from {config}: {e} — fix the --set values") from e
    check_replaceable(dst, overwrite=overwrite, source=src)  # refuse before the slow part
    sd = load_state_dict(src, subkey=subkey if subkey is not None else fam.subkey)
    try:
        params = fam.convert(sd, model)
    except ConversionError as e:
        raise ConversionError(f"{e} Set the module's sizes with --set FIELD=VALUE (python -m "
                              f"softdimo_jax.convert --help lists the {model_name} fields).") from e
    save_converted(dst, model_name, model, params, source=src, overwrite=overwrite)
    return model, params


def _fields_help() -> str:
    lines = ["fields (--set FIELD=VALUE, JSON values) and their defaults, per family:"]
    for name, fam in FAMILIES.items():
        try:
            fields = family_fields(name)
        except Exception as e:  # a family whose defaults need --bits: say so instead
            lines.append(f"  {name}: {fam.help} (fields unavailable: {e})")
            continue
        lines.append(f"  {name}: {fam.help}")
        lines.append("    " + ", ".join(f"{k}={json.dumps(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    want_help = any(a in ("-h", "--help") for a in argv)
    parser = argparse.ArgumentParser(
        prog="python -m softdimo_jax.convert",
        description="Convert a PyTorch checkpoint into an orbax checkpoint of our Flax module.",
        epilog=_fields_help() if want_help else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--bits", type=int, default=None, help="LFQ bits (MaskBit: 10/12/14/16/18)")
    parser.add_argument("--set", "--config-overrides", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="module field override, repeatable; VALUE is JSON (depth=12, "
                             "use_prenorm=true, ch_mult=[1,2,4]); fields and defaults are listed below")
    parser.add_argument("--subkey", default=None, help="entry of a wrapped checkpoint holding the weights")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is a converted checkpoint (written beside it, then swapped)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("src")
    parser.add_argument("dst")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides, family_fields(args.model, args.bits))
    model, params = convert(args.model, args.src, args.dst, bits=args.bits, overrides=overrides,
                            subkey=args.subkey, overwrite=args.overwrite)
    n = sum(np.size(x) for x in jax.tree.leaves(params))
    print(f"wrote {args.dst} ({args.model}, {n / 1e6:.1f}M parameters)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return guarded("convert", lambda: run(strip_debug(argv)), debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
