"""Soft-Di[M]O reward fine-tuning + TTEO of the distilled MaskGen-L VQ (SPEC §1.4, §1.5).

Runs after configs/maskgen_t2i_distill.py in the same workdir (its distillation state is
restored; the distill block must be the same):

    python -m softdimo_jax.convert --model openclip HPS_v2.1_compressed.pt ckpt/hps_v2
    python -m softdimo_jax.main --config=configs/maskgen_t2i_reward.py --workdir=gs://BUCKET/dimo_maskgen \\
        --config.prompt_file=gs://BUCKET/prompts.txt --config.teacher_checkpoint=ckpt/maskgen \\
        --config.text_encoder_checkpoint=ckpt/clip_text --config.tokenizer_checkpoint=ckpt/tatitok \\
        --config.reward_checkpoints.hps_v2=ckpt/hps_v2 --config.reward.rewards.hps_v2=1.0

L = w_dimo · L_DiMO − w_reward · Σ λ_i R_i(TA-TiTok(softmax(z_θ/τ) @ codebook, text), caption):
the reward gradient reaches the generator's logits through the soft embedding and the frozen
TA-TiTok decoder; the images enter each reward through its differentiable preprocessing
(no uint8 rounding). `reward.rewards` = {name: λ}; a weight of 0 leaves a reward out, and
every weight is 0 by default (the run refuses to start until one is set with its
checkpoint). Rewards: clip_score (OpenCLIP ViT-L-14), hps_v2 (HPS v2/v2.1 ViT-H-14),
pickscore (HF CLIP-H), image_reward (ImageReward v1.0, `--model blip`; its prompts go
through BERT WordPiece: set `bert_vocab` to bert-base-uncased's vocab.txt). Per-reward option:
`{"weight": w, "truncate_prompts": True}` cuts captions longer than the reward's context
(refused by default).

Not published and chosen here: λ, w_reward (the Di[M]O term is a sum over positions, so
the reward weight is large, as w_GAN = 200 for MaskBit), the steps and lr (Di[M]O's
Meissonic generator lr 1e-6, Adam). TTEO: K = 2 steps of SGD at lr 0.2 on the input
embedding of the first captions' samples (the paper's K ∈ {2, 4}, best-of-N up to 16).
"""

from __future__ import annotations

import ml_collections

from softdimo_jax.core.defaults import default_reward_config, default_tteo_config
from softdimo_jax.runtime.config_files import sibling_config_module

REWARDS = ("clip_score", "hps_v2", "pickscore", "image_reward")


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    c = t2i_reward_config("maskgen_t2i_distill", preset)
    c.lock()
    return c


def t2i_reward_config(distill_config: str, preset: str) -> ml_collections.ConfigDict:
    """configs/<distill_config>.py:<preset> with the reward and TTEO blocks (also the base of
    configs/meissonic_t2i_reward.py); returned unlocked."""
    c = sibling_config_module(__file__, distill_config)["get_config"](preset).copy_and_resolve_references()
    c.unlock()
    c.pipeline = "t2i_reward"
    # Converted reward models (python -m softdimo_jax.convert --model openclip / hfclip).
    c.reward_checkpoints = ml_collections.ConfigDict({name: "" for name in REWARDS})
    # ImageReward's tokenizer: bert-base-uncased's vocab.txt (or SOFTDIMO_BERT_VOCAB).
    c.bert_vocab = ""
    r = default_reward_config()
    r.num_steps = 5_000
    r.batch_size = c.distill.batch_size  # GLOBAL
    r.seed = 2
    r.rewards = ml_collections.ConfigDict({name: 0.0 for name in REWARDS})
    r.eval_rewards = ml_collections.ConfigDict({name: 0.0 for name in REWARDS})
    r.w_reward = 100.0
    r.w_dimo = 1.0
    r.soft_mode = "soft"
    r.soft_tau = 1.0
    r.gen_optimizer = "adam"
    r.gen_lr = 1e-6
    r.gen_weight_decay = 0.0
    r.gen_warmup_steps = 100
    r.gen_grad_clip = 1.0
    r.log_every = 100
    r.ckpt_every = 1000
    c.reward = r
    t = default_tteo_config()
    del t.rewards  # TTEO here optimises the reward block's rewards
    t.steps = 2
    t.lr = 0.2
    t.best_of = 1
    c.tteo = t
    return c
