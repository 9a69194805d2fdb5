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


def check_inception(fx: Fixture) -> list[Check]:
    images = {k: v for k, v in fx.inputs.items() if np.asarray(v).ndim == 4}
    if not images:
        raise ValueError(f"{fx.path}: no image inputs (uint8 (B, 3, H, W)) under in/")
    wanted = sorted({k.split("/", 1)[1] for k in fx.outputs if "/" in k})
    model = inception_from_cfg(fx.cfg, features=tuple(f for f in FEATURES if f in wanted) or ("2048",))
    params = convert_inception(fx.sd, model, name=f"{fx.path} sd/")

    batch = max(v.shape[0] for v in images.values())
    prep = jax.jit(lambda x: model.apply({"params": params}, x, method=FIDInceptionV3.preprocess))
    net = jax.jit(lambda p, x: model.apply({"params": p}, x, preprocessed=True))
    checks = []
    with jax.default_matmul_precision("float32"):
        for name, img in sorted(images.items()):
            nhwc = np.ascontiguousarray(np.asarray(img).transpose(0, 2, 3, 1))
            if nhwc.dtype != np.uint8:
                raise ValueError(f"{fx.path}: in/{name} must be uint8, got {nhwc.dtype}")
            n = len(nhwc)
            x = prep(jnp.asarray(nhwc))
            x = jnp.pad(x, ((0, batch - n), (0, 0), (0, 0), (0, 0)))
            got = net(params, x)
            for feat in model.features:
                key = f"{name}/{feat}"
                if key in fx.outputs:
                    checks.append(compare(key, np.asarray(got[feat])[:n], fx.outputs[key], "features"))
    return checks
