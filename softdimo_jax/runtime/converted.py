"""Converted checkpoints: the table of model families and their save / load.

A converted checkpoint is a directory with `params/` (orbax, {'params': ...}) and
`model.json` (family + module config + source + parameter count), written by
`python -m softdimo_jax.convert` (or `save_converted`, e.g. for an exported student).
`load_converted(DST)` returns (model, params) and refuses a checkpoint whose stored config
differs from the module asked for, or whose arrays do not fit it.

Families live in `FAMILIES` (name -> Family with lazily imported "module:attr" strings):
loading a tokenizer does not import every other family's model and converter.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.state_dict import check_params_match
from softdimo_jax.runtime.checkpointing import orbax

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
        return self.module_cls()(**config_from_json(config))

    def convert(self, sd, model):
        return _resolve(self.converter)(sd, model)


FAMILIES: dict[str, Family] = {
    "maskbit_generator": Family(
        module="softdimo_jax.models.maskbit_bert:LFQBert",
        converter="softdimo_jax.conversion.maskbit:convert_maskbit_bert",
        defaults="softdimo_jax.conversion.maskbit:maskbit_generator_defaults",
        expected="softdimo_jax.conversion.maskbit:bert_expected_params",
        help="MaskBit LFQBert teacher (maskbit_generator_<bits>bit.bin)",
    ),
    "maskbit_tokenizer": Family(
        module="softdimo_jax.models.maskbit_tokenizer:ConvVQModel",
        converter="softdimo_jax.conversion.maskbit:convert_maskbit_tokenizer",
        defaults="softdimo_jax.conversion.maskbit:maskbit_tokenizer_defaults",
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


# ------------------------------------------------------------------ config <-> JSON


def config_value_to_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [config_value_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: config_value_to_json(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    try:  # dtypes (jnp.float32, np.dtype('bfloat16'), ...)
        return np.dtype(value).name
    except TypeError:
        raise TypeError(f"cannot store config value {value!r} as JSON") from None


def config_from_json(config: dict) -> dict:
    out = {}
    for k, v in config.items():
        if k == "dtype" and isinstance(v, str):
            v = jnp.dtype(v)
        elif isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return out


def module_config(model) -> dict:
    """The dataclass fields of a Flax module as a JSON-able dict (parent/name dropped)."""
    return {
        f.name: config_value_to_json(getattr(model, f.name))
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
    """Writes `params` of `model` as a converted checkpoint directory (see module docstring)."""
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
    ckpt = orbax().StandardCheckpointer()
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
    path = os.path.abspath(path)
    meta = read_meta(path)
    fam = FAMILIES[meta["family"]]
    stored = meta["config"]
    bad = sorted(set(runtime_overrides) - RUNTIME_FIELDS)
    if bad:
        raise ValueError(f"only {sorted(RUNTIME_FIELDS)} may be overridden at load time, not {bad}")
    if model is None:
        model = fam.build({**stored, **{k: config_value_to_json(v) for k, v in runtime_overrides.items()}})
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
    restored = orbax().StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR))
    params = restored["params"]
    expected = expected_params(model)
    check_params_match(params, expected, name=path)
    params = jax.tree.map(lambda x: np.asarray(x), params)
    return model, params


def expected_params(model):
    """The params shape tree of a registered family's module (what a checkpoint must hold)."""
    return _resolve(FAMILIES[family_of(model)].expected)(model)


def _leaves(tree):
    return jax.tree.leaves(tree)
