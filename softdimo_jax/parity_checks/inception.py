"""Parity check for the `inception_fid` family (torch-fidelity's FID Inception-v3).

Every `in/<image>` (uint8 NCHW, any size) is run through the converted network and every
`out/<image>/<feature>` compared with tolerance `features`. The resize runs per input size;
the network itself is compiled once (inputs padded to one batch size) to keep it fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.inception import convert_inception
from softdimo_jax.models.inception import FEATURES, INPUT_SIZE, NUM_CLASSES, FIDInceptionV3
from softdimo_jax.parity import Check, Fixture, compare


def inception_from_cfg(cfg: dict, **overrides) -> FIDInceptionV3:
    feats = tuple(str(f) for f in cfg.get("features", ("2048", "logits_unbiased")))
    kw = dict(
        input_size=int(cfg.get("input_size", INPUT_SIZE)),
        num_classes=int(cfg.get("num_classes", NUM_CLASSES)),
        features=tuple(f for f in FEATURES if f in feats) or ("2048",),
    )
    kw.update(overrides)
    return FIDInceptionV3(**kw)


def _as_uint8_nhwc(img: np.ndarray, what: str) -> np.ndarray:
    if img.shape[1] == 3:  # the fixtures' PyTorch layout
        img = img.transpose(0, 2, 3, 1)
    elif img.shape[-1] != 3:
        raise ValueError(f"{what}: expected (B, 3, H, W) or (B, H, W, 3) images, got {img.shape}")
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.integer) or img.min() < 0 or img.max() > 255:
            raise ValueError(f"{what}: images must be uint8 (or integers in [0, 255]), got {img.dtype}")
        img = img.astype(np.uint8)
    return np.ascontiguousarray(img)


def check_inception(fx: Fixture) -> list[Check]:
    images = {k: v for k, v in fx.inputs.items() if np.asarray(v).ndim == 4}
    if not images:
        raise ValueError(f"{fx.path}: no image inputs (uint8 (B, 3, H, W)) under in/")
    # Outputs are `out/<image>/<feature>`; with a single image input, bare `out/<feature>` too.
    targets: dict[str, dict[str, str]] = {name: {} for name in images}
    for key in fx.outputs:
        name, _, feat = key.rpartition("/")
        if name in images and feat in FEATURES:
            targets[name][feat] = key
        elif not name and len(images) == 1 and feat in FEATURES:
            targets[next(iter(images))][feat] = key
    wanted = {f for t in targets.values() for f in t}
    if not wanted:
        raise ValueError(f"{fx.path}: no outputs named <image>/<feature> with features in {FEATURES}; got {sorted(fx.outputs)}")
    model = inception_from_cfg(fx.cfg, features=tuple(f for f in FEATURES if f in wanted))
    params = convert_inception(fx.sd, model, name=f"{fx.path} sd/")

    batch = max(v.shape[0] for v in images.values())
    prep = jax.jit(lambda x: model.apply({"params": params}, x, method=FIDInceptionV3.preprocess))
    net = jax.jit(lambda p, x: model.apply({"params": p}, x, preprocessed=True))
    checks = []
    with jax.default_matmul_precision("float32"):
        for name, img in sorted(images.items()):
            nhwc = _as_uint8_nhwc(np.asarray(img), f"{fx.path}: in/{name}")
            n = len(nhwc)
            x = prep(jnp.asarray(nhwc))
            x = jnp.pad(x, ((0, batch - n), (0, 0), (0, 0), (0, 0)))
            got = net(params, x)
            for feat, key in sorted(targets[name].items()):
                checks.append(compare(key, np.asarray(got[feat])[:n], fx.outputs[key], "features"))
    return checks
