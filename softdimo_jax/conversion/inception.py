"""FID Inception-v3 state dicts (pytorch-fid / torch-fidelity) → Flax params.

Works for `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid) and
`weights-inception-2015-12-05-6726825d.pth` (torch-fidelity): both use torchvision's key
names (`Mixed_5b.branch1x1.conv.weight`, `....bn.running_mean`, `fc.weight`). The Flax
module mirrors those names, so the converter walks the module's own parameter tree and
takes the matching key for each leaf: every target is filled, every source key is used
(BatchNorm's `num_batches_tracked` counters are skipped), shapes are checked on the
PyTorch layout, and all problems are reported at once. Half-precision weights are upcast.

    params = convert_inception(load_state_dict("pt_inception-2015-12-05-6726825d.pth"))
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from softdimo_jax.conversion.state_dict import StrictStateDict, check_params_match, load_state_dict
from softdimo_jax.models.inception import FIDInceptionV3
from softdimo_jax.runtime.converted import load_converted

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def inception_expected_params(model: FIDInceptionV3) -> Any:
    """Param shapes of `model` (no allocation, no compute)."""
    x = jnp.zeros((1, model.input_size, model.input_size, 3), jnp.float32)
    init = lambda: model.init(jax.random.PRNGKey(0), x, preprocessed=True)
    return jax.eval_shape(init)["params"]


def inception_defaults(bits: int | None = None) -> dict:
    """Module fields of the published network (for softdimo_jax.convert; `bits` is unused)."""
    return dict(input_size=299, num_classes=1008, features=["2048", "logits_unbiased"], precision=None)


def _torch_key_and_shape(path: tuple[str, ...], shape: tuple[int, ...]):
    """Flax leaf → (PyTorch key, PyTorch-layout shape, transform to the Flax layout)."""
    *mods, leaf = path
    prefix = ".".join(mods)
    if mods and mods[-1] == "conv" and leaf == "kernel":
        kh, kw, cin, cout = shape
        return prefix + ".weight", (cout, cin, kh, kw), lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    if mods and mods[-1] == "bn":
        return f"{prefix}.{_BN_NAMES[leaf]}", shape, None
    if mods == ["fc"] and leaf == "kernel":
        return "fc.weight", shape[::-1], lambda w: np.ascontiguousarray(w.T)
    if mods == ["fc"] and leaf == "bias":
        return "fc.bias", shape, None
    raise ValueError(f"no PyTorch name known for Flax parameter {'/'.join(path)}")


def convert_inception(
    sd: Mapping[str, np.ndarray],
    model: FIDInceptionV3 | None = None,
    *,
    name: str = "FID Inception-v3",
) -> dict:
    """Strict conversion of a FID Inception state dict into params for `model`."""
    model = FIDInceptionV3() if model is None else model
    expected = inception_expected_params(model)
    s = StrictStateDict(sd, name=name, strip_prefixes=("module.",))
    s.skip(*[k for k in s.keys() if k.endswith(".num_batches_tracked")])
    flat = {}
    for path, leaf in traverse_util.flatten_dict(expected).items():
        key, shape, transform = _torch_key_and_shape(path, tuple(leaf.shape))
        flat[path] = s.take(key, shape, transform=transform)
    s.finish()
    params = traverse_util.unflatten_dict(flat)
    check_params_match(params, expected, name=name)
    return params


def load_inception(path: str, model: FIDInceptionV3 | None = None) -> dict:
    """Params from a checkpoint file (.pth/.bin via the restricted unpickler, .npz, .safetensors).

    A `.npz` written by `save_params` (keys `params/<flax path>`) and a directory written by
    `python -m softdimo_jax.convert --model fid_inception` load directly.
    """
    if os.path.isdir(path):
        return load_converted(path)[1]
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if any(k.startswith("params/") for k in z.files):
                flat = {tuple(k[len("params/"):].split("/")): np.asarray(z[k], np.float32) for k in z.files}
                params = traverse_util.unflatten_dict(flat)
                model = FIDInceptionV3() if model is None else model
                check_params_match(params, inception_expected_params(model), name=path)
                return params
    return convert_inception(load_state_dict(path), model, name=path)


def save_params(params: Any, path: str) -> None:
    """Saves converted params as a flat `.npz` (`params/<flax path>`), loadable by `load_inception`."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    np.savez(path, **{"params/" + k: np.asarray(v) for k, v in flat.items()})
