"""Parity checks for the CLIP reward models: `openclip` (CLIP score / HPS v2, GELU and the
same weights built with QuickGELU under `out/quickgelu/`) and `hfclip` (PickScore).

Each builds `models.clip.CLIP` from the fixture's cfg alone, converts `sd/` with the real
converter, runs `in/` (NCHW → NHWC only here) and compares every output, including the
differentiable preprocessing (`raw_image` → `preprocessed` → `score_from_raw`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.clip import convert_hfclip, convert_openclip
from softdimo_jax.models.clip import CLIP, clip_logits, hfclip_from_cfg, hps_score, l2_normalize, openclip_from_cfg, pickscore
from softdimo_jax.models.image_preprocess import clip_preprocess
from softdimo_jax.parity import Check, Fixture, compare


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _preprocess_cfg(fx: Fixture, crop: str):
    pre = fx.cfg.get("preprocess", {})
    return int(pre.get("resize_shorter_side_to", 224)), pre.get("crop", crop)


def _features(model, params, images, ids, mask=None):
    """(image features (B, E), ClipTextOutput) in one compiled program."""

    def run(params, images, ids, mask):
        v = {"params": params}
        return model.apply(v, images, method=CLIP.encode_image), model.apply(v, ids, mask, method=CLIP.text_hidden)

    return jax.jit(run)(params, images, ids, mask)


def check_openclip(fx: Fixture) -> list[Check]:
    i, o = fx.inputs, fx.outputs
    size, crop = _preprocess_cfg(fx, "torchvision")
    checks: list[Check] = []
    with jax.default_matmul_precision("highest"):
        raw = clip_preprocess(_nhwc(i["raw_image"]), size, crop=crop)
        if "preprocessed" in o:
            checks.append(compare("preprocessed", raw, _nhwc(o["preprocessed"]), "image"))
        for prefix, quick in (("", bool(fx.cfg.get("quick_gelu", False))), ("quickgelu/", True)):
            if prefix and not any(k.startswith(prefix) for k in o):
                continue
            model = openclip_from_cfg(fx.cfg, quick_gelu=quick)
            params = convert_openclip(fx.sd, model, name=f"{fx.path}:sd")
            ids = jnp.asarray(i["ids"], jnp.int32)
            img, txt = _features(model, params, _nhwc(i["image"]), ids)
            txt = txt.pooled[:, 0]
            raw_img, _ = _features(model, params, raw, ids)
            scale = params["logit_scale"]
            got = {
                "image_features": (img, "hidden"),
                "text_features": (txt, "hidden"),
                "image_features_normalized": (l2_normalize(img), "hidden"),
                "text_features_normalized": (l2_normalize(txt), "hidden"),
                "logit_scale": (scale, "image"),
                "logit_scale_exp": (jnp.exp(scale), "image"),
                "logits_per_image": (clip_logits(img, txt, scale), "image"),
                "hps_score": (hps_score(img, txt), "image"),
                "score_from_raw": (hps_score(raw_img, txt), "image"),
            }
            checks += [compare(prefix + k, g, o[prefix + k], kind) for k, (g, kind) in got.items() if prefix + k in o]
    return checks


def check_hfclip(fx: Fixture) -> list[Check]:
    i, o = fx.inputs, fx.outputs
    size, crop = _preprocess_cfg(fx, "floor")
    model = hfclip_from_cfg(fx.cfg)
    params = convert_hfclip(fx.sd, model, name=f"{fx.path}:sd")
    checks: list[Check] = []
    with jax.default_matmul_precision("highest"):
        raw = clip_preprocess(_nhwc(i["raw_image"]), size, crop=crop)
        if "preprocessed" in o:
            checks.append(compare("preprocessed", raw, _nhwc(o["preprocessed"]), "image"))
        ids = jnp.asarray(i["input_ids"], jnp.int32)
        mask = jnp.asarray(i["attention_mask"], jnp.int32) if "attention_mask" in i else None
        img, th = _features(model, params, _nhwc(i["pixel_values"]), ids, mask)
        raw_img, _ = _features(model, params, raw, ids, mask)
        txt = th.pooled[:, 0]
        scale = params["logit_scale"]
        got = {
            "image_embeds_unnormalized": (img, "hidden"),
            "text_embeds_unnormalized": (txt, "hidden"),
            "image_embeds": (l2_normalize(img), "hidden"),
            "text_embeds": (l2_normalize(txt), "hidden"),
            "text_last_hidden_state": (th.text_guidance, "hidden"),
            "logit_scale": (scale, "image"),
            "logit_scale_exp": (jnp.exp(scale), "image"),
            "logits_per_image": (clip_logits(img, txt, scale), "image"),
            "pickscore": (pickscore(img, txt, scale), "image"),
            "score_from_raw": (pickscore(raw_img, txt, scale), "image"),
        }
        checks += [compare(k, g, o[k], kind) for k, (g, kind) in got.items() if k in o]
    return checks
