"""Parity check for the `blip` family (ImageReward): BLIP ViT + med.py BERT + MLP head.

Builds `models.blip.ImageReward` from the fixture's cfg alone, converts `sd/` with the real
converter, runs `in/image` (NCHW, already normalised) with `in/input_ids` and
`in/attention_mask`, and compares every output; `in/raw_image` ([0, 1], any size) goes
through the reward entry (`core.image_reward`: preprocessing + model) for `preprocessed` and
`score_from_raw`. Tolerances are the issue's: features
within 1e-4 relative to their largest magnitude (the absolute bound printed is 1e-4 · max|ref|),
scores (`mlp_raw`, `reward`) within 1e-4 absolute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.blip import convert_image_reward
from softdimo_jax.core.image_reward import image_reward
from softdimo_jax.models.blip import image_reward_from_cfg
from softdimo_jax.models.image_preprocess import clip_preprocess
from softdimo_jax.parity import Check, Fixture

FEATURE_REL_TOL = 1e-4
SCORE_ABS_TOL = 1e-4


def _check(name: str, got, want, tol: float) -> Check:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return Check(f"{name} (shape {got.shape} != {want.shape})", float("inf"), tol)
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    return Check(name, err if np.all(np.isfinite(got)) else float("inf"), tol)


def feature_check(name: str, got, want) -> Check:
    scale = float(np.max(np.abs(want))) if np.size(want) else 1.0
    return _check(name, got, want, FEATURE_REL_TOL * max(scale, 1e-12))


def score_check(name: str, got, want) -> Check:
    return _check(name, got, want, SCORE_ABS_TOL)


def check_blip(fx: Fixture) -> list[Check]:
    model = image_reward_from_cfg(fx.cfg)
    params = convert_image_reward(fx.sd, model, name=f"{fx.path}:sd")
    i, o = fx.inputs, fx.outputs
    ids, mask = jnp.asarray(i["input_ids"], jnp.int32), jnp.asarray(i["attention_mask"], jnp.int32)
    with jax.default_matmul_precision("highest"):
        images = jnp.asarray(np.asarray(i["image"]).transpose(0, 2, 3, 1))
        out = jax.jit(model.apply)({"params": params}, images, ids, mask)
        if "raw_image" in i:
            raw = jnp.asarray(np.asarray(i["raw_image"]).transpose(0, 2, 3, 1))
            pre = clip_preprocess(raw, model.image_size, crop="torchvision")
            from_raw = jax.jit(image_reward, static_argnums=0)(model, params, raw, ids, mask)
    checks = []
    for name in ("image_embeds", "text_last_hidden_state", "text_cls_feature"):
        if name in o:
            checks.append(feature_check(name, getattr(out, name), o[name]))
    for name in ("mlp_raw", "reward"):
        if name in o:
            checks.append(score_check(name, getattr(out, name), o[name]))
    # The differentiable path from [0, 1] images: preprocessing, then the whole reward.
    if "raw_image" in i and "preprocessed" in o:
        checks.append(feature_check("preprocessed", np.asarray(pre).transpose(0, 3, 1, 2), o["preprocessed"]))
    if "raw_image" in i and "score_from_raw" in o:
        checks.append(score_check("score_from_raw", np.asarray(from_raw)[:, None], o["score_from_raw"]))
    return checks
