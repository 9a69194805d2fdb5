"""Converted checkpoints: the table of model families and their save / load.

A converted checkpoint is a directory with `params/` (orbax, {'params': ...}) and
`model.json` (family + module config + source + parameter count), written by
`python -m softdimo_jax.convert` (or `save_converted`, e.g. for an exported student, whose
model.json also names the `stage` it came from and its one-step `sampling` settings).
`load_converted(DST)` returns (model, params) and refuses a checkpoint whose stored config
differs from the module asked for, or whose arrays do not fit it.

Writing never destroys data: the new checkpoint is written beside DST and swapped in only
when complete, and `overwrite` replaces only a directory that is itself a converted
checkpoint (model.json + params/, nothing else).

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
from softdimo_jax.runtime.checkpointing import is_disk_full, orbax
from softdimo_jax.runtime.errors import BadInput, RunFailure

FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
PARAMS_DIR = "params"

# Module fields that do not change the parameters: they may differ between the stored
# config and the module a checkpoint is loaded into.
RUNTIME_FIELDS = frozenset({"dtype", "remat", "dropout"})


class ConfigMismatchError(BadInput):
    """A converted checkpoint was made for a module of another configuration."""


class NotConvertedError(BadInput, FileNotFoundError):
    """A path that should hold a converted checkpoint does not."""


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
    folder: "pkg.mod:fn", fn(dir) -> (module fields from the dir's config.json, weights file):
      families that come as diffusers-format folders (None: SRC must be a file).
    """

    module: str
    converter: str
    defaults: str
    expected: str
    subkey: str | None = None
    help: str = ""
    folder: str | None = None

    def module_cls(self):
        return _resolve(self.module)

    def default_config(self, bits: int | None) -> dict:
        return dict(_resolve(self.defaults)(bits))

    def build(self, config: dict):
        return self.module_cls()(**config_from_json(config))

    def convert(self, sd, model):
        return _resolve(self.converter)(sd, model)

    def read_folder(self, path: str) -> tuple[dict, str]:
        if self.folder is None:
            raise ValueError(f"{path} is a directory — this family takes a checkpoint file")
        return _resolve(self.folder)(path)


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
    "blip": Family(
        module="softdimo_jax.models.blip:ImageReward",
        converter="softdimo_jax.conversion.blip:convert_image_reward",
        defaults="softdimo_jax.conversion.blip:image_reward_defaults",
        expected="softdimo_jax.models.blip:image_reward_expected_params",
        help="ImageReward v1.0 reward model (ImageReward.pt; BLIP ViT-L + BERT + MLP head)",
    ),
    "meissonic_transformer": Family(
        module="softdimo_jax.models.meissonic:MeissonicTransformer",
        converter="softdimo_jax.conversion.meissonic:convert_meissonic_transformer",
        defaults="softdimo_jax.conversion.meissonic:meissonic_transformer_defaults",
        expected="softdimo_jax.models.meissonic:transformer_expected_params",
        folder="softdimo_jax.conversion.meissonic:transformer_folder",
        help="Meissonic Transformer2DModel (the transformer/ folder: config.json + diffusion_pytorch_model.*)",
    ),
    "meissonic_vqvae": Family(
        module="softdimo_jax.models.meissonic_vq:MeissonicVQModel",
        converter="softdimo_jax.conversion.meissonic:convert_meissonic_vq",
        defaults="softdimo_jax.conversion.meissonic:meissonic_vq_defaults",
        expected="softdimo_jax.models.meissonic_vq:vq_expected_params",
        folder="softdimo_jax.conversion.meissonic:vq_folder",
        help="Meissonic VQ model (the vqvae/ folder: config.json + diffusion_pytorch_model.*)",
    ),
    "meissonic_text": Family(
        module="softdimo_jax.models.meissonic_text:MeissonicTextEncoder",
        converter="softdimo_jax.conversion.meissonic:convert_meissonic_text",
        defaults="softdimo_jax.conversion.meissonic:meissonic_text_defaults",
        expected="softdimo_jax.models.meissonic_text:meissonic_text_expected_params",
        folder="softdimo_jax.conversion.meissonic:text_folder",
        help="Meissonic's CLIP-ViT-H-14 text encoder (the text_encoder/ folder: config.json + model.safetensors"
        " or pytorch_model.bin)",
    ),
    "openclip": Family(
        module="softdimo_jax.models.clip:CLIP",
        converter="softdimo_jax.conversion.clip:convert_openclip",
        defaults="softdimo_jax.conversion.clip:openclip_defaults",
        expected="softdimo_jax.models.clip:clip_expected_params",
        help="OpenCLIP CLIP reward model: HPS v2/v2.1 ViT-H-14 (default sizes; HPS_v2*.pt) or CLIP score"
        " ViT-L-14 (open_clip_pytorch_model.bin/.safetensors, with the ViT-L-14 --set in the README)",
    ),
    "hfclip": Family(
        module="softdimo_jax.models.clip:HFCLIPModel",
        converter="softdimo_jax.conversion.clip:convert_hfclip",
        defaults="softdimo_jax.conversion.clip:hfclip_defaults",
        expected="softdimo_jax.models.clip:clip_expected_params",
        help="transformers CLIPModel: PickScore_v1 CLIP-H (model.safetensors)",
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
    raise BadInput(f"no registered family for {type(model).__name__} — use one of {sorted(FAMILIES)}")


# ------------------------------------------------------------------ save / load


class ExistsError(BadInput, FileExistsError):
    """The destination exists and --overwrite was not given."""


def check_replaceable(path: str, *, overwrite: bool, source: str = "") -> None:
    """Refuses to write over `path` unless it is absent, or `overwrite` and it is a converted
    checkpoint (model.json + params/ and nothing else) that does not hold `source`."""
    path = os.path.abspath(path)
    if source:
        src = os.path.abspath(source)
        if src == path or src.startswith(path + os.sep):
            raise BadInput(f"the destination {path} holds the source {source} — write the converted "
                           "checkpoint to another directory")
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise ExistsError(f"{path} exists — pass --overwrite to replace it (only a converted "
                          "checkpoint is ever replaced) or choose another destination")
    if not os.path.isdir(path) or os.path.islink(path):
        raise BadInput(f"--overwrite refused: {path} is not a directory — only a converted checkpoint "
                       "directory is replaced; remove it yourself or choose another destination")
    extra = sorted(set(os.listdir(path)) - {CONFIG_FILE, PARAMS_DIR})
    try:
        read_meta(path)
    except (BadInput, OSError, ValueError):
        extra = extra or [f"(no valid {CONFIG_FILE})"]
    if extra:
        raise BadInput(f"--overwrite refused: {path} is not a converted checkpoint (it holds "
                       f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}) — remove it yourself "
                       "or choose another destination")


def save_converted(path: str, family: str, model, params, *, source: str = "", overwrite: bool = False,
                   extra: dict | None = None) -> None:
    """Writes `params` of `model` as a converted checkpoint directory (see module docstring).
    `extra`: more JSON-able model.json entries (an exported student's `stage`, `sampling`).

    The checkpoint is written to a sibling directory and renamed into place when complete;
    an existing one (see `check_replaceable`) is removed only after that.
    """
    path = os.path.abspath(path)
    check_replaceable(path, overwrite=overwrite, source=source)
    count = int(sum(np.size(x) for x in _leaves(params)))
    nbytes = int(sum(np.asarray(x).nbytes for x in _leaves(params)))
    meta = {
        "format": FORMAT_VERSION,
        "family": family,
        "config": module_config(model),
        "source": os.path.basename(source),
        "param_count": count,
    }
    clash = sorted(set(extra or {}) & set(meta))
    if clash:
        raise ValueError(f"extra model.json entries {clash} would replace the standard ones")
    meta.update(extra or {})
    parent = os.path.dirname(path)
    tmp = f"{path}.partial-{os.getpid()}"
    old = f"{path}.replaced-{os.getpid()}"
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        ckpt = orbax().StandardCheckpointer()
        ckpt.save(os.path.join(tmp, PARAMS_DIR), {"params": params})
        ckpt.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise RunFailure(f"no space left writing {path}: the checkpoint needs about "
                             f"{nbytes / 2**20:.1f} MiB in {parent} — free space there or choose "
                             "another destination (nothing was replaced)") from e
        if isinstance(e, PermissionError):
            raise BadInput(f"cannot write {path} ({e.strerror}) — choose a writable destination") from e
        raise
    if os.path.lexists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise NotConvertedError(
            f"{path} is not a converted checkpoint (no {CONFIG_FILE}) — create one with "
            "python -m softdimo_jax.convert"
        )
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotConvertedError(f"{cfg_path} is unreadable ({e}) — re-create the checkpoint with "
                                "python -m softdimo_jax.convert") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or meta.get("family") not in FAMILIES:
        fmt, fam = (meta.get("format"), meta.get("family")) if isinstance(meta, dict) else (None, None)
        raise NotConvertedError(f"{cfg_path}: unknown format {fmt} / family {fam!r} — re-create the "
                                "checkpoint with python -m softdimo_jax.convert")
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
        raise BadInput(f"only {sorted(RUNTIME_FIELDS)} may be overridden at load time, not {bad}")
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
    try:
        restored = orbax().StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR))
        params = restored["params"]
    except Exception as e:  # orbax / tensorstore errors on a missing or damaged params/
        raise NotConvertedError(f"{path}/{PARAMS_DIR} cannot be read ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:160]}) — re-create the checkpoint with "
                                "python -m softdimo_jax.convert") from e
    expected = expected_params(model)
    check_params_match(params, expected, name=path)
    params = jax.tree.map(lambda x: np.asarray(x), params)
    return model, params


def expected_params(model):
    """The params shape tree of a registered family's module (what a checkpoint must hold)."""
    return _resolve(FAMILIES[family_of(model)].expected)(model)


def _leaves(tree):
    return jax.tree.leaves(tree)
