"""Convert PyTorch checkpoints into orbax checkpoints of our Flax modules.

    python -m softdimo_jax.convert --model maskbit_generator --bits 14 \\
        maskbit_generator_14bit.bin ckpt/maskbit_generator_14bit
    python -m softdimo_jax.convert --model maskbit_tokenizer --bits 14 \\
        maskbit_tokenizer_14bit.bin ckpt/maskbit_tokenizer_14bit
    # other sizes / settings: --set depth=12 --set hidden_dim=768 (module field names)

SRC may be `.bin`/`.pth`/`.pt`/`.ckpt` (read without PyTorch by a restricted unpickler),
`.safetensors` or `.npz`. DST becomes a directory with `params/` (orbax, {'params': ...})
and `model.json` (family + module config). `load_converted(DST)` returns (model, params)
and refuses a checkpoint whose stored config differs from the module asked for.

Families live in `FAMILIES` (name -> Family with lazily imported "module:attr" strings),
so other model families can be registered without importing their code here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import sys
from typing import Any, Callable

import numpy as np

FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
PARAMS_DIR = "params"

# Module fields that do not change the parameters: they may differ between the stored
# config and the module a checkpoint is loaded into.
RUNTIME_FIELDS = frozenset({"dtype", "remat", "dropout"})


class ConfigMismatchError(ValueError):
    """A converted checkpoint was made for a module of another configuration."""


def _resolve(spec: str) -> Any:
    mod, attr = spec.split(":")
    return getattr(importlib.import_module(mod), attr)


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build, default-configure and convert one model family.

    module: "pkg.mod:Class" of the Flax module (built as Class(**config)).
    converter: "pkg.mod:fn", fn(state_dict, model) -> params (strict).
    defaults: "pkg.mod:fn", fn(bits: int | None) -> dict of module fields.
    expected: "pkg.mod:fn", fn(model) -> the params shape tree (e.g. via jax.eval_shape).
    subkey: the entry of a wrapped PyTorch checkpoint that holds the weights (None: auto).
    """

    module: str
    converter: str
    defaults: str
    expected: str
    subkey: str | None = None
    help: str = ""

    def module_cls(self):
        return _resolve(self.module)

    def default_config(self, bits: int | None) -> dict:
        return dict(_resolve(self.defaults)(bits))

    def build(self, config: dict):
        return self.module_cls()(**_from_json(config))

    def convert(self, sd, model):
        return _resolve(self.converter)(sd, model)


FAMILIES: dict[str, Family] = {
    "maskbit_generator": Family(
        module="softdimo_jax.models.maskbit_bert:LFQBert",
        converter="softdimo_jax.conversion.maskbit:convert_maskbit_bert",
        defaults="softdimo_jax.convert:maskbit_generator_defaults",
        expected="softdimo_jax.conversion.maskbit:bert_expected_params",
        help="MaskBit LFQBert teacher (maskbit_generator_<bits>bit.bin)",
    ),
    "maskbit_tokenizer": Family(
        module="softdimo_jax.models.maskbit_tokenizer:ConvVQModel",
        converter="softdimo_jax.conversion.maskbit:convert_maskbit_tokenizer",
        defaults="softdimo_jax.convert:maskbit_tokenizer_defaults",
        expected="softdimo_jax.conversion.maskbit:tokenizer_expected_params",
        help="MaskBit lookup-free ConvVQModel (maskbit_tokenizer_<bits>bit.bin)",
    ),
    "fid_inception": Family(
        module="softdimo_jax.models.inception:FIDInceptionV3",
        converter="softdimo_jax.conversion.inception:convert_inception",
        defaults="softdimo_jax.conversion.inception:inception_defaults",
        expected="softdimo_jax.conversion.inception:inception_expected_params",
        help="FID Inception-v3 (pt_inception-2015-12-05-6726825d.pth, pytorch-fid / torch-fidelity)",
    ),
    "maskgen_vq": Family(
        module="softdimo_jax.models.maskgen:MaskGenVQ",
        converter="softdimo_jax.conversion.maskgen:convert_maskgen_vq",
        defaults="softdimo_jax.conversion.maskgen:maskgen_vq_defaults",
        expected="softdimo_jax.conversion.maskgen:maskgen_expected_params",
        help="MaskGen-VQ text-to-image MM-DiT (maskgen_vq_l.bin)",
    ),
    "tatitok": Family(
        module="softdimo_jax.models.tatitok:TATiTok",
        converter="softdimo_jax.conversion.maskgen:convert_tatitok",
        defaults="softdimo_jax.conversion.maskgen:tatitok_defaults",
        expected="softdimo_jax.conversion.maskgen:tatitok_expected_params",
        help="TA-TiTok VQ tokenizer (tatitok_bl128_vq.bin)",
    ),
    "clip_text": Family(
        module="softdimo_jax.models.clip_text:ClipTextTransformer",
        converter="softdimo_jax.conversion.maskgen:convert_clip_text",
        defaults="softdimo_jax.conversion.maskgen:clip_text_defaults",
        expected="softdimo_jax.conversion.maskgen:clip_text_expected_params",
        help="OpenCLIP ViT-L-14-336 text tower (full CLIP state dict accepted; visual.* ignored)",
    ),
    "maskgit_transformer": Family(
        module="softdimo_jax.models.maskgit:MaskGITTransformer",
        converter="softdimo_jax.conversion.maskgit:convert_maskgit_transformer",
        defaults="softdimo_jax.conversion.maskgit:maskgit_transformer_defaults",
        expected="softdimo_jax.models.maskgit:maskgit_expected_params",
        help="Di[M]O's MaskGIT teacher (MaskGIT_ImageNet_256.pth, weights under model_state_dict)",
    ),
    "taming_vqgan": Family(
        module="softdimo_jax.models.taming_vqgan:TamingVQModel",
        converter="softdimo_jax.conversion.maskgit:convert_taming_vqgan",
        defaults="softdimo_jax.conversion.maskgit:taming_vqgan_defaults",
        expected="softdimo_jax.models.taming_vqgan:vqgan_expected_params",
        help="taming VQGAN f16-1024 (Lightning last.ckpt; loss.* keys skipped and reported)",
    ),
}


def register(name: str, family: Family) -> None:
    """Adds a family (other modules may call this; or add an entry to FAMILIES)."""
    FAMILIES[name] = family


# ------------------------------------------------------------------ MaskBit defaults


def maskbit_generator_defaults(bits: int | None) -> dict:
    """MaskBit's released generator size (configs/maskbit.py holds the same numbers)."""
    bits = 14 if bits is None else int(bits)
    return dict(num_tokens=256, num_bits=bits, splits=2, hidden_dim=1024, depth=24, heads=16,
                mlp_dim=4096, num_classes=1000, dropout=0.1, use_prenorm=False)


def maskbit_tokenizer_defaults(bits: int | None) -> dict:
    """MaskBit's released tokenizer size (configs/maskbit.py holds the same numbers)."""
    bits = 14 if bits is None else int(bits)
    return dict(num_bits=bits, hidden_channels=128, channel_mult=[1, 1, 2, 2, 4],
                num_res_blocks=2, num_channels=3, sample_with_conv=True)


# ------------------------------------------------------------------ config <-> JSON


def _to_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    try:  # dtypes (jnp.float32, np.dtype('bfloat16'), ...)
        return np.dtype(value).name
    except TypeError:
        raise TypeError(f"cannot store config value {value!r} as JSON") from None


def _from_json(config: dict) -> dict:
    out = {}
    for k, v in config.items():
        if k == "dtype" and isinstance(v, str):
            import jax.numpy as jnp

            v = jnp.dtype(v)
        elif isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return out


def module_config(model) -> dict:
    """The dataclass fields of a Flax module as a JSON-able dict (parent/name dropped)."""
    return {
        f.name: _to_json(getattr(model, f.name))
        for f in dataclasses.fields(model)
        if f.name not in ("parent", "name")
    }


def _structural(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_FIELDS}


def family_of(model) -> str:
    for name, fam in FAMILIES.items():
        mod, attr = fam.module.split(":")
        if type(model).__name__ == attr and type(model).__module__ == mod:
            return name
    raise ValueError(f"no registered family for {type(model).__name__}")


# ------------------------------------------------------------------ save / load


def save_converted(path: str, family: str, model, params, *, source: str = "", overwrite: bool = False) -> None:
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
        shutil.rmtree(path)
    os.makedirs(path)
    count = int(sum(np.size(x) for x in _leaves(params)))
    meta = {
        "format": FORMAT_VERSION,
        "family": family,
        "config": module_config(model),
        "source": os.path.basename(source),
        "param_count": count,
    }
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, PARAMS_DIR), {"params": params})
    ckpt.wait_until_finished()
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def read_meta(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(
            f"{path} is not a converted checkpoint (no {CONFIG_FILE}); create one with "
            "python -m softdimo_jax.convert"
        )
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION or meta.get("family") not in FAMILIES:
        raise ValueError(f"{cfg_path}: unknown format {meta.get('format')} / family {meta.get('family')!r}")
    return meta


def load_converted(path: str, model=None, **runtime_overrides) -> tuple[Any, Any]:
    """(model, params) from a directory written by `save_converted` / the CLI.

    model: optional module to load into; its config must equal the stored one except for
      runtime fields (dtype, remat, dropout), else ConfigMismatchError lists the fields.
    runtime_overrides: dtype / remat / dropout for the module built from the stored config.
    """
    import jax
    import orbax.checkpoint as ocp

    from softdimo_jax.conversion.state_dict import check_params_match

    path = os.path.abspath(path)
    meta = read_meta(path)
    fam = FAMILIES[meta["family"]]
    stored = meta["config"]
    bad = sorted(set(runtime_overrides) - RUNTIME_FIELDS)
    if bad:
        raise ValueError(f"only {sorted(RUNTIME_FIELDS)} may be overridden at load time, not {bad}")
    if model is None:
        model = fam.build({**stored, **{k: _to_json(v) for k, v in runtime_overrides.items()}})
    else:
        if family_of(model) != meta["family"]:
            raise ConfigMismatchError(
                f"{path} holds a {meta['family']} checkpoint, not a {type(model).__name__}"
            )
        want, have = _structural(module_config(model)), _structural(stored)
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            lines = ", ".join(f"{k}: checkpoint {have.get(k)!r} vs module {want.get(k)!r}" for k in diff)
            raise ConfigMismatchError(f"{path} was converted for another config ({lines})")
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR))
    params = restored["params"]
    expected = _expected_params(model)
    check_params_match(params, expected, name=path)
    params = jax.tree.map(lambda x: np.asarray(x), params)
    return model, params


def _expected_params(model):
    return _resolve(FAMILIES[family_of(model)].expected)(model)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


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
    from softdimo_jax.conversion.state_dict import load_state_dict

    if model_name not in FAMILIES:
        raise ValueError(f"unknown --model {model_name!r}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[model_name]
    config = fam.default_config(bits)
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
    from softdimo_jax.conversion.state_dict import ConversionError

    try:
        model, params = convert(args.model, args.src, args.dst, bits=args.bits,
                                overrides=parse_overrides(args.overrides), subkey=args.subkey,
                                overwrite=args.overwrite)
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    n = sum(np.size(x) for x in _leaves(params))
    print(f"wrote {args.dst} ({args.model}, {n / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
