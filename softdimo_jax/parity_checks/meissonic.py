"""Parity checks for Meissonic: `meissonic_transformer` (forward, CFG, intermediate
activations, Di[M]O's perturbed-embedding call, the generation replay through the
pipeline + scheduler), `meissonic_vqvae` (encode, quantise, decode ids, decode soft) and
`meissonic_text` (the CLIP text encoder as Meissonic calls it, ids padded with the end token
and with 0, and the BPE tokenizer with Meissonic's end-token padding).

The modules are built from the fixture's `cfg.config` (the constructor arguments, i.e. the
config.json fields) through the same config reader the converter uses; `sd/` goes through
the real converter. NCHW <-> NHWC only at this boundary. Matmuls at full float32 precision.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.meissonic import (convert_meissonic_text, convert_meissonic_transformer,
                                               convert_meissonic_vq, meissonic_text_config_from_json,
                                               meissonic_transformer_config_from_json, meissonic_vq_config_from_json)
from softdimo_jax.data.clip_bpe import ClipBPETokenizer, default_merges_path
from softdimo_jax.models.meissonic import MeissonicTransformer, guided_logits, image_ids
from softdimo_jax.models.meissonic_text import MeissonicTextEncoder, meissonic_text_embeddings, meissonic_text_encode
from softdimo_jax.models.meissonic_vq import MeissonicVQModel
from softdimo_jax.parity import Check, Fixture, compare
from softdimo_jax.sampling.meissonic_sampler import meissonic_generate, temperatures

# Activations kept in (B, C, H, W) by the original.
_SPATIAL = ("embed", "down_block", "up_block_in", "up_block")


def _nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def _tuples(fields: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def build_transformer(cfg: dict) -> MeissonicTransformer:
    return MeissonicTransformer(**_tuples(meissonic_transformer_config_from_json(cfg.get("config", cfg), "cfg")))


def build_vq(cfg: dict) -> MeissonicVQModel:
    return MeissonicVQModel(**_tuples(meissonic_vq_config_from_json(cfg.get("config", cfg), "cfg")))


def build_text(cfg: dict) -> MeissonicTextEncoder:
    return MeissonicTextEncoder(**meissonic_text_config_from_json(cfg.get("config", cfg), "cfg"))


def check_text(fx: Fixture) -> list[Check]:
    model = build_text(fx.cfg)
    params = convert_meissonic_text(fx.sd, model, name=f"{fx.path}:sd")
    i, o = fx.inputs, fx.outputs
    checks: list[Check] = []
    with jax.default_matmul_precision("highest"):
        def run(p, ids):
            hidden, pooled = meissonic_text_encode(model, p, ids)
            last = model.apply({"params": p}, ids).text_guidance
            return {"encoder_hidden_states": hidden, "text_embeds": pooled, "last_hidden_state": last,
                    "embeddings": meissonic_text_embeddings(model, p, ids)}

        run = jax.jit(run)
        for prefix, key in (("", "ids"), ("pad0_", "ids_pad0")):
            if key in i:
                got = run(params, jnp.asarray(i[key], jnp.int32))
                checks += [compare(prefix + k, g, o[prefix + k], "hidden") for k, g in got.items() if prefix + k in o]
    if "tokenizer_ids" in o:
        local = os.path.join(os.path.dirname(os.path.abspath(fx.path)), "bpe_simple_vocab_16e6.txt.gz")
        tok = ClipBPETokenizer(local if os.path.exists(local) else default_merges_path(), context_length=77)
        ids = tok.tokenize(list(fx.cfg["tokenizer_captions"]), pad="eot")
        checks.append(compare("tokenizer_ids", ids, o["tokenizer_ids"], "ids"))
    return checks


def check_transformer(fx: Fixture) -> list[Check]:
    model = build_transformer(fx.cfg)
    params = convert_meissonic_transformer(fx.sd, model, name=f"{fx.path}:sd")
    v = {"params": params}
    i, o = fx.inputs, fx.outputs
    checks: list[Check] = []
    with jax.default_matmul_precision("highest"):
        # One compiled forward for every call: noise 0 with p = 0 is exactly the plain path.
        fwd = jax.jit(lambda v, t, c, p, m, ts, noise, pert: model.apply(
            v, t, c, p, m, ts, perturb_noise=noise, noise_emb_perturb=pert, return_intermediates=True))
        tokens = jnp.asarray(i["tokens"], jnp.int32)
        args = (jnp.asarray(i["micro_conds"]), jnp.asarray(i["timestep"]))
        zero = jnp.zeros(tokens.shape + (model.inner_dim,), jnp.float32)
        if "img_ids" in i:  # the model builds the standard ids from the grid
            grid_ids = image_ids(tokens.shape[1] // 2, tokens.shape[2] // 2)
            checks.append(compare("img_ids == the grid's ids", grid_ids, i["img_ids"], "ids"))
            checks.append(compare("txt_ids == 0", np.zeros_like(i["txt_ids"]), i["txt_ids"], "ids"))
        logits, inter = fwd(v, tokens, jnp.asarray(i["encoder_hidden_states"]), jnp.asarray(i["pooled_projections"]),
                            *args, zero, 0.0)
        checks.append(compare("logits", _nchw(logits), o["logits"], "logits"))
        for key in sorted(k for k in o if k.startswith("inter/")):
            name = key[len("inter/"):]
            if name not in inter:  # an activation the port does not expose: a failed check, not a crash
                checks.append(Check(f"{key} (not produced by the port)", float("inf"), 0.0))
                continue
            got = np.asarray(inter[name])
            checks.append(compare(key, _nchw(got) if name in _SPATIAL else got, o[key], "hidden"))
        if "cfg_logits" in o:
            uncond = fwd(v, tokens, jnp.asarray(i["negative_encoder_hidden_states"]),
                         jnp.asarray(i["negative_pooled_projections"]), *args, zero, 0.0)[0]
            checks.append(compare("cfg_uncond_logits", _nchw(uncond), o["cfg_uncond_logits"], "logits"))
            scale = float(fx.cfg["cfg_scale"])
            checks.append(compare("cfg_logits", _nchw(guided_logits(logits, uncond, scale)), o["cfg_logits"], "logits"))
        if "dimo_perturb_logits" in o:
            got = fwd(v, tokens, jnp.asarray(i["encoder_hidden_states"]), jnp.asarray(i["pooled_projections"]),
                      *args, jnp.asarray(_nhwc(i["dimo_perturb_noise"])), float(i["dimo_noise_emb_perturb"]))[0]
            checks.append(compare("dimo_perturb_logits", _nchw(got), o["dimo_perturb_logits"], "logits"))
        if "gen_ids" in o:
            checks += _check_generation(fx, model, params)
    return checks


def _check_generation(fx: Fixture, model: MeissonicTransformer, params) -> list[Check]:
    i, o, g = fx.inputs, fx.outputs, fx.cfg["generation"]
    n, b = int(g["num_inference_steps"]), int(g["batch"])
    grid = tuple(int(s) for s in i["gen_step_sampled_ids"].shape[2:])
    temp = g["temperature"]
    temp = tuple(float(t) for t in temp) if isinstance(temp, list) else float(temp)
    checks = [compare("gen_temperatures", temperatures(temp, n), i["gen_temperatures"], "hidden")]
    micro = np.asarray(i["gen_micro_conds"])
    if micro.shape[0] == 2 * b:  # guided: the pipeline repeats them for [negative; positive]
        checks.append(compare("gen_micro_conds: both halves equal", micro[:b], micro[b:], "ids"))
    expected_ids = np.asarray(i["gen_img_ids"])
    checks.append(compare("gen_img_ids == the grid's ids", image_ids(grid[0] // 2, grid[1] // 2), expected_ids, "ids"))
    recorded = {"sampled_ids": jnp.asarray(i["gen_step_sampled_ids"]), "gumbel": jnp.asarray(i["gen_step_gumbel"])}
    ids, tr = meissonic_generate(
        model, params, jnp.asarray(i["gen_prompt_embeds"]), jnp.asarray(i["gen_encoder_hidden_states"]),
        _opt(i, "gen_negative_prompt_embeds"), _opt(i, "gen_negative_encoder_hidden_states"),
        jnp.asarray(micro[:b]), recorded=recorded, grid=grid, num_steps=n, guidance_scale=float(g["guidance_scale"]),
        temperature=temp, return_trace=True)
    to_nchw = lambda x: np.transpose(np.asarray(x), (0, 1, 4, 2, 3))
    checks += [
        compare("gen_step_input_ids", tr["input_ids"], o["gen_step_input_ids"], "ids"),
        compare("gen_step_model_timestep", np.asarray(tr["timestep"])[:, None], o["gen_step_model_timestep"], "ids"),
        compare("gen_step_logits", to_nchw(tr["logits"]), o["gen_step_logits"], "logits"),
        compare("gen_step_guided_logits", to_nchw(tr["guided_logits"]), o["gen_step_guided_logits"], "logits"),
        compare("gen_step_mask_len", np.asarray(tr["mask_len"])[:-1], o["gen_step_mask_len"], "ids"),
        compare("gen_step_output_ids", tr["output_ids"], o["gen_step_output_ids"], "ids"),
        compare("gen_ids", ids, o["gen_ids"], "ids"),
    ]
    return checks


def _opt(inputs, key):
    return jnp.asarray(inputs[key]) if key in inputs else None


def check_vqvae(fx: Fixture) -> list[Check]:
    model = build_vq(fx.cfg)
    params = convert_meissonic_vq(fx.sd, model, name=f"{fx.path}:sd")
    v = {"params": params}
    i, o = fx.inputs, fx.outputs
    M = MeissonicVQModel
    checks: list[Check] = []
    with jax.default_matmul_precision("highest"):
        images = jnp.asarray(_nhwc(i["image"]))
        enc = jax.jit(lambda v, x: model.apply(v, x, method=M.encode))(v, images)
        checks.append(compare("encoder_latents", _nchw(enc["latents"]), o["encoder_latents"], "hidden"))
        checks.append(compare("indices", enc["indices"], o["indices"], "ids"))
        checks.append(compare("z_quantized", _nchw(enc["quantized"]), o["z_quantized"], "hidden"))
        checks.append(compare("reconstructed", _nchw(jax.jit(model.apply)(v, images)), o["reconstructed"], "image"))
        dec = jax.jit(lambda v, t: model.apply(v, t, method=M.decode_tokens))(v, jnp.asarray(i["tokens"], jnp.int32))
        checks.append(compare("decoded", _nchw(dec), o["decoded"], "image"))
        probs = jnp.asarray(i["soft_probs"])
        soft = model.apply(v, probs, method=M.soft_latents)
        checks.append(compare("soft_latents", _nchw(soft), o["soft_latents"], "hidden"))
        dsoft = jax.jit(lambda v, p: model.apply(v, p, method=M.decode_soft))(v, probs)
        checks.append(compare("decoded_soft", _nchw(dsoft), o["decoded_soft"], "image"))
    return checks
