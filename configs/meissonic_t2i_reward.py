"""Soft-Di[M]O reward fine-tuning + TTEO of the distilled Meissonic (SPEC §1.4, §1.5).

Runs after configs/meissonic_t2i_distill.py in the same workdir (its distillation state is
restored; the distill block must be the same, so pass the same preset and overrides):

    python -m softdimo_jax.convert --model openclip HPS_v2.1_compressed.pt ckpt/hps_v2
    python -m softdimo_jax.main --config=configs/meissonic_t2i_reward.py --workdir=gs://BUCKET/dimo_meissonic \\
        --config.prompt_embeddings=gs://BUCKET/prompts_clip_h.npz --config.teacher_checkpoint=ckpt/meissonic \\
        --config.tokenizer_checkpoint=ckpt/meissonic_vq \\
        --config.reward_checkpoints.hps_v2=ckpt/hps_v2 --config.reward.rewards.hps_v2=1.0
    # tiny random models (the distill tiny preset first, same workdir) and a converted reward model:
    python -m softdimo_jax.main --config=configs/meissonic_t2i_reward.py:tiny --workdir=/tmp/meissonic_tiny \\
        --config.reward_checkpoints.clip_score=ckpt/tiny_clip --config.reward.rewards.clip_score=1.0

L = w_dimo · L_DiMO − w_reward · Σ λ_i R_i(VQ(softmax(z_θ/τ) @ codebook), caption): the
reward gradient reaches the generator's logits through the soft codebook latents (64x64 at
1024 px) and the frozen Meissonic VQ decoder, whose 1024 px images enter each reward through
its differentiable resize + crop (no uint8 rounding). The prompt .npz must hold `captions`
(the rewards' text side is encoded from them once per host); everything else is as
configs/maskgen_t2i_reward.py (rewards, λ, options, TTEO).

Not published and chosen here: λ, w_reward, the steps and the generator lr (Di[M]O's Meissonic
lr 1e-6, Adam); the global batch is the distillation's (4 per device). TTEO: K = 2 SGD steps
at lr 0.2 on the perturbed output of the embedding block (where Di[M]O's noise_emb_perturb
acts). The `tiny` preset takes a few steps at a large lr so that tests see the reward move.
"""

from __future__ import annotations

import ml_collections

from softdimo_jax.runtime.config_files import sibling_config_module


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    c = sibling_config_module(__file__, "maskgen_t2i_reward")["t2i_reward_config"]("meissonic_t2i_distill", preset)
    if c.preset == "tiny":
        r = c.reward
        r.num_steps, r.gen_lr, r.gen_warmup_steps = 4, 1e-2, 1
        r.w_reward = 1000.0
        r.log_every, r.ckpt_every = 1, 2
        c.tteo.steps = 1
    c.lock()
    return c
