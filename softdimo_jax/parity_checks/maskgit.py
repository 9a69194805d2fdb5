"""Parity checks for the MaskGIT fixture families (`maskgit_transformer`, `taming_vqgan`).

Each check builds the JAX module from the fixture's `cfg` alone, converts `sd/` with the
real converter and compares every reference output.

Image range: the taming VQGAN fixture works in the original's [-1, 1] NCHW space while our
API takes and returns NHWC images in [0, 1]. The check feeds (image + 1) / 2 to `encode`
and compares 2·decoded − 1 with the reference, i.e. image errors are reported on the
original's [-1, 1] scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.maskgit import convert_maskgit_transformer, convert_taming_vqgan
from softdimo_jax.models.maskgit import MaskGITTransformer, maskgit_transformer_from_cfg
from softdimo_jax.models.taming_vqgan import TamingVQModel, taming_vqgan_from_cfg
from softdimo_jax.parity import Check, Fixture, compare


def _nhwc(x):
    return np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def check_transformer(fx: Fixture) -> list[Check]:
    model = maskgit_transformer_from_cfg(fx.cfg, dropout=0.0)
    params = convert_maskgit_transformer(fx.sd, model, name=f"{fx.path} sd/")
    tokens = jnp.asarray(fx.inputs["tokens"], jnp.int32)
    labels = jnp.asarray(fx.inputs["labels"], jnp.int32)
    drop = fx.inputs.get("drop_label")
    drop = None if drop is None else jnp.asarray(drop, bool)
    want = fx.outputs["logits"]
    checks = []
    with jax.default_matmul_precision("float32"):
        fwd = jax.jit(lambda p, t, y, m: model.apply({"params": p}, t, y, drop_label=m))
        checks.append(compare("logits", fwd(params, tokens, labels, drop), want, "logits"))
        # The input_embeddings path (generator / soft embeddings) must agree with ids.
        emb = model.apply({"params": params}, tokens, method=MaskGITTransformer.embed_tokens)
        via_emb = jax.jit(lambda p, e, y, m: model.apply({"params": p}, None, y, drop_label=m, input_embeddings=e))(
            params, emb, labels, drop
        )
        checks.append(compare("logits(input_embeddings path)", via_emb, want, "logits"))
    return checks


def check_vqgan(fx: Fixture) -> list[Check]:
    model = taming_vqgan_from_cfg(fx.cfg)
    params = convert_taming_vqgan(fx.sd, model, name=f"{fx.path} sd/")
    out = fx.outputs
    checks = []
    apply = lambda method: jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))
    to_pm1 = lambda img01: _nchw(2.0 * np.asarray(img01, np.float64) - 1.0)
    with jax.default_matmul_precision("float32"):
        if "image" in fx.inputs:
            images01 = (_nhwc(fx.inputs["image"]) + 1.0) / 2.0  # fixture images are in [-1, 1]
            enc = apply(TamingVQModel.encode)(params, jnp.asarray(images01))
            if "encoder_h" in out:
                checks.append(compare("encoder_h", _nchw(enc["h"]), out["encoder_h"], "image"))
            if "indices" in out:
                checks.append(compare("indices", enc["indices"], out["indices"], "ids"))
        if "decoded" in out and "indices" in out:
            img = apply(TamingVQModel.decode_tokens)(params, jnp.asarray(out["indices"], jnp.int32))
            checks.append(compare("decoded", to_pm1(img), out["decoded"], "image"))
        if "soft_probs" in fx.inputs:
            probs = jnp.asarray(fx.inputs["soft_probs"], jnp.float32)
            if "soft_latents" in out:
                lat = apply(TamingVQModel.soft_latents)(params, probs)
                checks.append(compare("soft_latents", _nchw(lat), out["soft_latents"], "image"))
            if "decoded_soft" in out:
                img = apply(TamingVQModel.decode_soft)(params, probs)
                checks.append(compare("decoded_soft", to_pm1(img), out["decoded_soft"], "image"))
    return checks
