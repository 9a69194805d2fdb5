"""Parity checks for the MaskGen families: `maskgen_vq`, `tatitok`, `clip_text`.

Each builds the JAX module from the fixture's cfg alone, converts `sd/` through the real
converter, runs `in/` and compares with `out/` (NCHW <-> NHWC only at this boundary).
Matmuls run at full float32 precision so that accelerators do not fall back to TF32/bf16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.parity import Check, Fixture, compare
from softdimo_jax.conversion.maskgen import convert_clip_text, convert_maskgen_vq, convert_tatitok
from softdimo_jax.data.clip_bpe import ClipBPETokenizer, default_merges_path
from softdimo_jax.models.clip_text import clip_text_from_cfg, drop_to_null
from softdimo_jax.models.maskgen import MaskGenVQ, aesthetic_embedding, guided_logits, maskgen_vq_from_cfg
from softdimo_jax.models.tatitok import TATiTok, tatitok_from_cfg
from softdimo_jax.sampling.maskgen_sampler import maskgen_generate


def _hi():
    return jax.default_matmul_precision("highest")


def _jit(model, method=None):
    # One compiled program per entry point is cheaper than op-by-op dispatch.
    return jax.jit(functools.partial(model.apply, method=method) if method else model.apply)


# ----------------------------------------------------------------------------------------
def check_maskgen_vq(fx: Fixture) -> list[Check]:
    model = maskgen_vq_from_cfg(fx.cfg)
    params = convert_maskgen_vq(fx.sd, model, name=f"{fx.path}:sd")
    v = {"params": params}
    i, o = fx.inputs, fx.outputs
    checks: list[Check] = []
    with _hi():
        tokens = jnp.asarray(i["tokens"], jnp.int32)
        cond = jnp.asarray(i["condition"])
        pooled = jnp.asarray(i["condition_pooled"])
        score = jnp.asarray(i["aesthetic_score"]) if "aesthetic_score" in i else None
        b = tokens.shape[0]
        fwd = _jit(model)
        logits = fwd(v, tokens, cond, pooled, score)
        checks.append(compare("logits", logits, o["logits"], "logits"))
        if "micro_cond_embedding" in o:
            emb = aesthetic_embedding(score, model.micro_condition_embed_dim)
            checks.append(compare("micro_cond_embedding", emb, o["micro_cond_embedding"], "hidden"))
        if "condition_pooled_with_micro" in o:
            got = model.apply(v, pooled, score, method=MaskGenVQ.pooled_with_micro)
            checks.append(compare("condition_pooled_with_micro", got, o["condition_pooled_with_micro"], "hidden"))
        if "cfg_logits" in o:
            none_c = jnp.broadcast_to(jnp.asarray(i["none_condition"]), cond.shape)
            none_p = jnp.broadcast_to(jnp.asarray(i["none_condition_pooled"]), pooled.shape)
            uncond = fwd(v, tokens, none_c, none_p, score)
            scale = float(fx.cfg.get("cfg_scale", 3.0))
            checks.append(compare("cfg_logits", guided_logits(logits, uncond, scale), o["cfg_logits"], "logits"))
        if "gen_ids" in o:
            checks += _check_generate(fx, model, params, maskgen_generate)
    return checks


def _check_generate(fx, model, params, maskgen_generate) -> list[Check]:
    i, o = fx.inputs, fx.outputs
    kw = dict(fx.cfg.get("generate_kwargs", {}))
    # The original ignores the value of generate()'s sample_aesthetic_score and fills the
    # score from its config (model.maskgen.sample_aesthetic_score, default 6.0).
    aes_cfg = fx.cfg.get("model", {}).get("maskgen", {}).get("sample_aesthetic_score", 6.0)
    if kw.get("sample_aesthetic_score") is None and model.micro_condition:
        raise NotImplementedError("generate() without an aesthetic score does not run in the original")
    ids, trace = maskgen_generate(
        model, params,
        jnp.asarray(i["gen_condition"]), jnp.asarray(i["gen_condition_pooled"]),
        jnp.asarray(i["gen_none_condition"]), jnp.asarray(i["gen_none_condition_pooled"]),
        None if float(kw.get("randomize_temperature", 1.5)) == 0 else jax.random.PRNGKey(0),
        float(aes_cfg),
        num_steps=int(kw.get("num_sample_steps", 16)),
        guidance_scale=float(kw.get("guidance_scale", 12.0)),
        randomize_temperature=float(kw.get("randomize_temperature", 1.5)),
        softmax_temperature_annealing=bool(kw.get("softmax_temperature_annealing", True)),
        guidance_decay=str(kw.get("guidance_decay", "cosine")),
        guidance_decay_scale_pow=float(kw.get("guidance_decay_scale_pow", 1.0)),
        prob_sorting=bool(kw.get("prob_sorting", True)),
        mask_schedule=str(fx.cfg.get("model", {}).get("maskgen", {}).get("mask_schedule_strategy", "arccos")),
        return_trace=True,
    )
    checks = [compare("gen_ids", ids, o["gen_ids"], "ids")]
    if "gen_step_input_ids" in o:
        checks.append(compare("gen_step_input_ids", trace["input_ids"], o["gen_step_input_ids"], "ids"))
    if "gen_step_logits" in o:
        checks.append(compare("gen_step_logits", trace["logits"], o["gen_step_logits"], "logits"))
    if "gen_step_aesthetic" in o:
        checks.append(compare("gen_step_aesthetic", trace["aesthetic"], o["gen_step_aesthetic"], "hidden"))
    return checks


# ----------------------------------------------------------------------------------------
def check_clip_text(fx: Fixture) -> list[Check]:
    import os


    model = clip_text_from_cfg(fx.cfg)
    params = convert_clip_text(fx.sd, model, name=f"{fx.path}:sd")
    v = {"params": params}
    i, o = fx.inputs, fx.outputs
    checks: list[Check] = []
    with _hi():
        fwd = _jit(model)
        out = fwd(v, jnp.asarray(i["ids"], jnp.int32))
        for name in ("penultimate", "pooled", "text_guidance"):
            if name in o:
                checks.append(compare(name, getattr(out, name), o[name], "hidden"))
        if "pre_condition" in o:
            pre = fwd(v, jnp.asarray(i["pre_ids"], jnp.int32))
            cond, pooled = drop_to_null(pre.penultimate[:-1], pre.pooled[:-1], pre.penultimate[-1:],
                                        pre.pooled[-1:], i["pre_drop_mask"])
            checks.append(compare("pre_condition", cond, o["pre_condition"], "hidden"))
            checks.append(compare("pre_condition_pooled", pooled, o["pre_condition_pooled"], "hidden"))
    if "tokenizer_ids" in o:
        local = os.path.join(os.path.dirname(os.path.abspath(fx.path)), "bpe_simple_vocab_16e6.txt.gz")
        path = local if os.path.exists(local) else default_merges_path()
        tok = ClipBPETokenizer(path, context_length=int(fx.cfg.get("context_length", 77)))
        ids = tok.tokenize(list(fx.cfg["tokenizer_captions"]))
        checks.append(compare("tokenizer_ids", ids, o["tokenizer_ids"], "ids"))
    return checks


# ----------------------------------------------------------------------------------------
def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def _c1l(x):
    """(B, L, C) latents -> the original's (B, C, 1, L)."""
    return np.asarray(x).transpose(0, 2, 1)[:, :, None, :]


def check_tatitok(fx: Fixture) -> list[Check]:
    model = tatitok_from_cfg(fx.cfg)
    params = convert_tatitok(fx.sd, model, name=f"{fx.path}:sd")
    v = {"params": params}
    i, o = fx.inputs, fx.outputs
    checks: list[Check] = []
    with _hi():
        text = jnp.asarray(i["text_guidance"])
        if "image" in i:
            # The fixture's images are in [0, 1] already; only the layout changes.
            images = jnp.asarray(np.asarray(i["image"]).transpose(0, 2, 3, 1))
            rec, enc = _jit(model)(v, images, text)
            if "encoder_z" in o:
                checks.append(compare("encoder_z", _c1l(enc["encoder_z"]), o["encoder_z"], "hidden"))
            if "indices" in o:
                checks.append(compare("indices", np.asarray(enc["indices"])[:, None, :], o["indices"], "ids"))
            if "z_quantized" in o:
                checks.append(compare("z_quantized", _c1l(enc["z_quantized"]), o["z_quantized"], "hidden"))
            if "reconstructed" in o:
                checks.append(compare("reconstructed", _nchw(rec), o["reconstructed"], "image"))
        if "decoded" in o:
            dec = _jit(model, TATiTok.decode_tokens)(v, jnp.asarray(i["tokens"], jnp.int32), text)
            checks.append(compare("decoded", _nchw(dec), o["decoded"], "image"))
        if "soft_latents" in o or "decoded_soft" in o:
            probs = jnp.asarray(i["soft_probs"])
            lat = model.apply(v, probs, method=TATiTok.soft_latents)
            if "soft_latents" in o:
                checks.append(compare("soft_latents", _c1l(lat), o["soft_latents"], "hidden"))
            if "decoded_soft" in o:
                dec = _jit(model, TATiTok.decode_soft)(v, probs, text)
                checks.append(compare("decoded_soft", _nchw(dec), o["decoded_soft"], "image"))
    return checks
