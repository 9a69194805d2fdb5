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
from softdimo_jax.runtime.converted import FAMILIES, module_config, save_converted

# ------------------------------------------------------------------ CLI


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items) -> dict:
    out = {}
    for item in items or []:
        for part in item.split() if " " in item else [item]:
            if "=" not in part:
                raise ValueError(f"override {part!r} must look like field=value")
            k, v = part.split("=", 1)
            out[k.strip().removeprefix("config.")] = _parse_value(v.strip())
    return out


def convert(model_name: str, src: str, dst: str, *, bits: int | None = None, overrides: dict | None = None,
            subkey: str | None = None, overwrite: bool = False) -> tuple[Any, Any]:
    """Library form of the CLI: converts SRC into DST and returns (model, params)."""
    if model_name not in FAMILIES:
        raise ValueError(f"unknown --model {model_name!r}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[model_name]
    config = fam.default_config(bits)
    if os.path.isdir(src):  # diffusers-format folder: the architecture comes from its config.json
        folder_config, src = fam.read_folder(src)
        config.update(folder_config)
    unknown = sorted(set(overrides or {}) - set(module_config(fam.build(config))))
    if unknown:
        raise ValueError(f"unknown config fields {unknown} for {model_name}; fields: {sorted(config)}")
    config.update(overrides or {})
    model = fam.build(config)
    sd = load_state_dict(src, subkey=subkey if subkey is not None else fam.subkey)
    params = fam.convert(sd, model)
    save_converted(dst, model_name, model, params, source=src, overwrite=overwrite)
    return model, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m softdimo_jax.convert",
        description="Convert a PyTorch checkpoint into an orbax checkpoint of our Flax module.",
        epilog="families: " + "; ".join(f"{k}: {v.help}" for k, v in FAMILIES.items()),
    )
    parser.add_argument("--model", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--bits", type=int, default=None, help="LFQ bits (MaskBit: 10/12/14/16/18)")
    parser.add_argument("--set", "--config-overrides", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE", help="module config override (repeatable)")
    parser.add_argument("--subkey", default=None, help="entry of a wrapped checkpoint holding the weights")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("src")
    parser.add_argument("dst")
    args = parser.parse_args(argv)
    try:
        model, params = convert(args.model, args.src, args.dst, bits=args.bits,
                                overrides=parse_overrides(args.overrides), subkey=args.subkey,
                                overwrite=args.overwrite)
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    n = sum(np.size(x) for x in jax.tree.leaves(params))
    print(f"wrote {args.dst} ({args.model}, {n / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
