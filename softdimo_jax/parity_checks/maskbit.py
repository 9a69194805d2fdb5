"""Parity checks for the MaskBit fixture families (`maskbit_bert`, `maskbit_tokenizer`).

Each check builds the JAX module from the fixture's `cfg` alone, converts `sd/` with the
real converter and compares every reference output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.maskbit import convert_maskbit_bert, convert_maskbit_tokenizer
from softdimo_jax.models.maskbit_bert import LFQBert, maskbit_bert_from_cfg
from softdimo_jax.models.maskbit_tokenizer import maskbit_tokenizer_from_cfg
from softdimo_jax.parity import Check, Fixture, compare


def _nhwc(x):
    return np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def check_bert(fx: Fixture) -> list[Check]:
    model = maskbit_bert_from_cfg(fx.cfg, dropout=0.0)
    params = convert_maskbit_bert(fx.sd, model, name=f"{fx.path} sd/")
    tokens = jnp.asarray(fx.inputs["tokens"], jnp.int32)
    labels = jnp.asarray(fx.inputs["labels"], jnp.int32)
    drop = fx.inputs.get("drop_label_mask")
    drop = None if drop is None else jnp.asarray(drop, bool)
    checks = []
    with jax.default_matmul_precision("float32"):
        logits = jax.jit(
            lambda p, t, y, m: model.apply({"params": p}, t, y, drop_label_mask=m)
        )(params, tokens, labels, drop)
        if "logits" in fx.outputs:
            checks.append(compare("logits", logits, fx.outputs["logits"], "logits"))
        if "input_bits" in fx.outputs:
            bits = model.apply({"params": params}, tokens, method=LFQBert.tokens_to_bits)
            checks.append(compare("input_bits", bits, fx.outputs["input_bits"], "logits"))
            # The continuous-bits path must give the same logits as the token path.
            via_bits = model.apply(
                {"params": params}, None, labels, drop_label_mask=drop,
                input_bits=jnp.asarray(fx.outputs["input_bits"]),
            )
            checks.append(compare("logits(input_bits path)", via_bits, fx.outputs["logits"], "logits"))
    return checks


def check_tokenizer(fx: Fixture) -> list[Check]:
    model = maskbit_tokenizer_from_cfg(fx.cfg)
    params = convert_maskbit_tokenizer(fx.sd, model, name=f"{fx.path} sd/")
    v = {"params": params}
    out = fx.outputs
    checks = []
    with jax.default_matmul_precision("float32"):
        if "image" in fx.inputs:
            enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(
                params, jnp.asarray(_nhwc(fx.inputs["image"]))
            )
            if "encoder_z" in out:
                checks.append(compare("encoder_z", _nchw(enc["z"]), out["encoder_z"], "image"))
            if "indices" in out:
                checks.append(compare("indices", enc["indices"], out["indices"], "ids"))
        dec_tokens = jax.jit(lambda p, i: model.apply({"params": p}, i, method=model.decode_tokens))
        dec_bits = jax.jit(lambda p, b: model.apply({"params": p}, b, method=model.decode_bits))
        if "decoded" in out and "indices" in out:
            img = dec_tokens(params, jnp.asarray(out["indices"], jnp.int32))
            checks.append(compare("decoded", _nchw(img), out["decoded"], "image"))
        if "decoded_soft" in out and "soft_bits" in fx.inputs:
            img = dec_bits(params, jnp.asarray(_nhwc(fx.inputs["soft_bits"])))
            checks.append(compare("decoded_soft", _nchw(img), out["decoded_soft"], "image"))
    del v
    return checks
