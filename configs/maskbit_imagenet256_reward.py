"""Soft-Di[M]O reward fine-tuning of the refined 14-bit MaskBit (ImageNet 256), SPEC §1.4.

Runs after configs/maskbit_imagenet256_distill.py (and, with reward.source='gan', after
configs/maskbit_imagenet256_gan.py) in the same workdir:

    python -m softdimo_jax.main --config=configs/maskbit_imagenet256_reward.py \\
        --workdir=gs://BUCKET/dimo_maskbit14 \\
        --config.teacher_checkpoint=gs://BUCKET/ckpt/gen14 --config.tokenizer_checkpoint=gs://BUCKET/ckpt/tok14 \\
        --config.reward.rewards.brightness=1.0

L = w_dimo · L_DiMO − w_reward · Σ λ_i R_i(Dec(soft bits), class): the reward gradient
reaches the generator through the frozen tokenizer decoder. `reward.rewards` names
registered rewards (softdimo_jax.core.reward) with their weights; a weight of 0 leaves a
reward out. The reward models of the paper (CLIP score, HPS v2, PickScore, ImageReward) are
not ported yet: the only reward usable here today is the weight-free toy `brightness`, so
every weight is 0 by default and the run refuses to start until one is set. AdamW lr 5e-7, weight decay 0.01 as the GAN phase.
"""

from __future__ import annotations

import ml_collections

from softdimo_jax.core.defaults import default_reward_config
from softdimo_jax.runtime.config_files import sibling_config_module


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    # config.distill (and config.gan when reward.source='gan') are replaced by the saved
    # settings of those runs in this workdir at run time (their states are restored).
    c = sibling_config_module(__file__, "maskbit_imagenet256_gan")["get_config"](preset).copy_and_resolve_references()
    c.unlock()
    c.pipeline = "reward"
    r = default_reward_config()
    r.source = "gan"  # the state to start from: 'gan' (<workdir>/gan) or 'distill'
    r.num_steps = 5_000
    r.batch_size = 64 * 8  # GLOBAL
    # {reward: weight}; set a weight with --config.reward.rewards.NAME=w (locked configs
    # accept only keys that exist, so every usable reward is listed here).
    r.rewards = ml_collections.ConfigDict({"brightness": 0.0})
    r.gen_lr = 5e-7
    r.gen_weight_decay = 0.01
    r.log_every = 100
    r.ckpt_every = 1000
    c.reward = r
    c.lock()
    return c
