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
    if drop is None:
        # The original indexes `cls_token[None] = drop_label` when no mask is given, which
        # drops EVERY label; our API treats None as "drop nothing", so mirror it here.
        drop = np.ones(labels.shape[0], bool)
    drop = jnp.asarray(drop, bool)
    checks = []

    @jax.jit
    def run(p, t, y, m, bits_in):
        logits = model.apply({"params": p}, t, y, drop_label_mask=m)
        bits = model.apply({"params": p}, t, method=LFQBert.tokens_to_bits)
        # The continuous-bits path must give the same logits as the token path.
        via_bits = model.apply({"params": p}, None, y, drop_label_mask=m, input_bits=bits_in)
        return logits, bits, via_bits

    ref_bits = fx.outputs.get("input_bits")
    bits_in = model.tokens_to_bits(tokens) if ref_bits is None else jnp.asarray(ref_bits, jnp.float32)
    with jax.default_matmul_precision("float32"):
        logits, bits, via_bits = run(params, tokens, labels, drop, bits_in)
    if "logits" in fx.outputs:
        checks.append(compare("logits", logits, fx.outputs["logits"], "logits"))
        checks.append(compare("logits(input_bits path)", via_bits, fx.outputs["logits"], "logits"))
    if ref_bits is not None:
        checks.append(compare("input_bits", bits, ref_bits, "logits"))
    return checks


def check_tokenizer(fx: Fixture) -> list[Check]:
    model = maskbit_tokenizer_from_cfg(fx.cfg)
    params = convert_maskbit_tokenizer(fx.sd, model, name=f"{fx.path} sd/")
    out = fx.outputs
    image = fx.inputs.get("image")
    image = None if image is None else jnp.asarray(_nhwc(image))
    ids = out.get("indices")
    ids = None if ids is None else jnp.asarray(ids, jnp.int32)
    soft = fx.inputs.get("soft_bits")
    soft = None if soft is None else jnp.asarray(_nhwc(soft))

    @jax.jit
    def run(p, image, ids, soft):  # one compilation for every output
        v = {"params": p}
        res = {}
        if image is not None:
            res["enc"] = model.apply(v, image, method=model.encode)
        if ids is not None:
            res["decoded"] = model.apply(v, ids, method=model.decode_tokens)
        if soft is not None:
            res["decoded_soft"] = model.apply(v, soft, method=model.decode_bits)
        return res

    with jax.default_matmul_precision("float32"):
        res = run(params, image, ids, soft)
    checks = []
    if "enc" in res:
        if "encoder_z" in out:
            checks.append(compare("encoder_z", _nchw(res["enc"]["z"]), out["encoder_z"], "image"))
        if "indices" in out:
            checks.append(compare("indices", res["enc"]["indices"], out["indices"], "ids"))
    if "decoded" in res and "decoded" in out:
        checks.append(compare("decoded", _nchw(res["decoded"]), out["decoded"], "image"))
    if "decoded_soft" in res and "decoded_soft" in out:
        checks.append(compare("decoded_soft", _nchw(res["decoded_soft"]), out["decoded_soft"], "image"))
    return checks
