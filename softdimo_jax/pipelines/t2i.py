"""Text-to-image reward fine-tuning + TTEO of a distilled MaskGen or Meissonic (SPEC §1.4, §1.5).

`t2i_reward(config, workdir)` (configs/maskgen_t2i_reward.py, configs/meissonic_t2i_reward.py)
runs after the family's distill config in the same workdir: it restores the finished
distillation state of <workdir>/distill and trains

    L = w_dimo · L_DiMO − w_reward · Σ_i λ_i R_i(TA-TiTok(softmax(z_θ/τ) @ C, text), caption)

(Meissonic: its VQ decoder on the soft 2-D latents softmax(z_θ/τ) @ C, no text guidance)

with the rewards of `config.reward.rewards` (clip_score, hps_v2, pickscore, and any other
registered reward) loaded from `config.reward_checkpoints.<name>` (converted checkpoints).
Each reward's text side is computed once for this host's captions (the prompt table) and
travels with the text conditions. Writes <workdir>/reward (checkpoints, TensorBoard,
the EMA student as a converted checkpoint, a one-step grid) and, when `config.tteo.steps`
> 0, a TTEO grid of the first captions with the soft reward before / after.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from softdimo_jax.core.adapters import make_adapter
from softdimo_jax.core.dimo import Distiller, generator_params
from softdimo_jax.core.t2i_reward import T2IRewardRefiner, prompt_reward_inputs
from softdimo_jax.data import prompts
from softdimo_jax.data.wordpiece import WordPieceTokenizer
from softdimo_jax.evaluation.t2i import reward_set_from_checkpoints
from softdimo_jax.models.maskgen import MaskGenVQ
from softdimo_jax.models.meissonic import DIMO_MICRO_CONDS, MeissonicTransformer
from softdimo_jax.models.meissonic_vq import MeissonicVQModel
from softdimo_jax.models.tatitok import TATiTok
from softdimo_jax.pipelines import at_scale, meissonic_t2i, phases
from softdimo_jax.runtime import artifacts
from softdimo_jax.runtime.artifacts import log
from softdimo_jax.runtime.errors import BadInput
from softdimo_jax.sampling.t2i_tteo import make_t2i_tteo_sampler


def image_reward_prompts(config):
    """ImageReward reads its prompts through BERT WordPiece (config.bert_vocab or
    SOFTDIMO_BERT_VOCAB): captions -> (input_ids, attention_mask), each (N, 35)."""
    tokenizer = WordPieceTokenizer(config.get("bert_vocab") or None)
    return lambda captions: tokenizer(list(captions))


# Prompt encoders of rewards whose text side is not CLIP BPE: reward name -> fn(config) ->
# encoder(captions) -> per-prompt inputs (leading axis N).
PROMPT_ENCODERS: dict = {"image_reward": image_reward_prompts}


def load_t2i_rewards(spec, config):
    """The RewardSet of `spec` ({name: weight}) with its converted models from
    config.reward_checkpoints and the CLIP BPE tokenizer for prompts."""
    ckpts = config.get("reward_checkpoints") or {}
    paths = {name: ckpts.get(name, "") for name in spec} if hasattr(ckpts, "get") else {}
    return reward_set_from_checkpoints(paths, spec, bpe_merges=config.get("bpe_merges") or None)


def load_t2i_models(config):
    """(generator model, teacher params, (decoder, params)): a converted MaskGen teacher with
    TA-TiTok, or a Meissonic transformer with its VQ model (the random tiny models of the
    Meissonic `tiny` preset when it names no checkpoint)."""
    if meissonic_t2i.uses_random_models(config):
        return meissonic_t2i.random_models(config)
    model, params, (tok_model, tok_params) = at_scale.load_teacher_and_tokenizer(config)
    at_scale.check_family(config, model)
    if not ((isinstance(model, MaskGenVQ) and isinstance(tok_model, TATiTok))
            or (isinstance(model, MeissonicTransformer) and isinstance(tok_model, MeissonicVQModel))):
        raise BadInput("text-to-image reward fine-tuning needs a converted MaskGen teacher with TA-TiTok, or a "
                       "Meissonic transformer with its VQ model — set config.teacher_checkpoint and "
                       "config.tokenizer_checkpoint to them")
    return model, params, (tok_model, tok_params)


def reward_prompt_table(config, rset, model):
    """This host's captions with the generator's conditions (MaskGen: the OpenCLIP text tower,
    plus TA-TiTok's text guidance; Meissonic: its prompt table, captions required) and every
    reward's per-prompt inputs, computed once."""
    if isinstance(model, MeissonicTransformer):
        table = meissonic_t2i.reward_prompt_table(config, model)
    else:
        clip, clip_params, bpe = at_scale.load_text_encoder(config)
        table = prompts.load_prompt_conditions(
            config.get("prompt_file", ""), clip, clip_params, bpe, null_prompt=config.get("null_prompt", ""),
            chunk=int(config.get("prompt_encode_chunk", 64)), text_guidance=True)
    encoders = {r.name: PROMPT_ENCODERS[r.name](config) for r in rset.rewards if r.name in PROMPT_ENCODERS}
    return table.with_extra(reward_text=prompt_reward_inputs(rset, table.captions, encoders))


def t2i_reward(config, workdir: str) -> None:
    dcfg, rcfg = config.distill, config.reward
    spec = {name: w for name, w in rcfg.rewards.items() if w}
    if not spec:
        raise ValueError(
            f"every weight of config.reward.rewards is 0 ({dict(rcfg.rewards)}); set one, e.g. "
            "--config.reward.rewards.hps_v2=1.0 with --config.reward_checkpoints.hps_v2=DIR")
    mesh = at_scale.distill_mesh(dcfg)
    model, teacher_params, (tok_model, tok_params) = load_t2i_models(config)
    rset = load_t2i_rewards(spec, config)
    table = reward_prompt_table(config, rset, model)
    log(f"[reward] {len(table)} captions on this host; rewards {dict(spec)}")
    adapter = make_adapter(model, dcfg, **prompts.null_conditions_kwargs(table))
    teacher_params = Distiller(adapter, dcfg, mesh).place_teacher(teacher_params)
    start = at_scale.refinement_start(config, workdir, "distill", adapter, teacher_params, tok_model, mesh)
    refiner = T2IRewardRefiner(adapter, dcfg, rcfg, tok_model, rset, mesh)
    stage_dir = os.path.join(workdir, "reward")
    result = phases.train_refinement(
        "reward", refiner, refiner.init_state, (start,), rcfg, stage_dir,
        batch_fn=table.batch_fn(int(rcfg.batch_size), int(rcfg.seed)),
        frozen={"teacher": teacher_params, "tokenizer": tok_params, "reward": rset.params},
        keep=int(dcfg.keep_checkpoints), fingerprint=at_scale.stage_identity(config, workdir, "distill"))
    gen = generator_params(result.state, dcfg.sample.use_ema)
    at_scale.export_one_step_student("reward", config, stage_dir, model, gen)
    n = max(int(config.get("grid_samples", 16)), mesh.size)
    n -= n % mesh.size
    rows = table.rows(np.arange(n) % len(table))
    tcfg = config.get("tteo")
    for k in sorted({0} | ({int(tcfg.steps)} if tcfg is not None and int(tcfg.steps) > 0 else set())):
        sampler = make_t2i_tteo_sampler(
            model, tok_model, rset, steps=k, lr=float(tcfg.lr) if tcfg is not None else 0.2,
            best_of=int(tcfg.best_of) if (tcfg is not None and k) else 1, temperature=float(dcfg.sample.temperature),
            soft_mode=str(rcfg.soft_mode), tau=float(rcfg.soft_tau), r_init=float(dcfg.r_init),
            sigma_init=float(dcfg.sigma_init), aesthetic_score=float(dcfg.get("aesthetic_score", 6.5)),
            micro_conds=tuple(dcfg.get("micro_conds", DIMO_MICRO_CONDS)), grid=dcfg.get("token_grid"), mesh=mesh)
        out = jax.device_get(sampler(gen, tok_params, rset.params, jax.random.PRNGKey(int(rcfg.seed)), rows))
        name = "student_hard" if k == 0 else f"tteo_k{k}"
        artifacts.save_grid(stage_dir, name, np.asarray(out["images"]), nrow=None)
        stats = {"soft_reward_before": float(np.mean(out["reward_init"])),
                 "soft_reward_after": float(np.mean(out["reward_final"])), "steps": k, **sampler.cost}
        log(f"[reward] {name}: {json.dumps(stats)}")
    at_scale.write_local_report(workdir)
