"""Default hyperparameters of the post-distillation phases (SPEC §1.3–1.5): GAN refinement,
reward fine-tuning and test-time embedding optimisation (TTEO).

Pipelines embed these as `config.gan`, `config.reward` and `config.tteo`. The Di[M]O part
of the GAN and reward phases (CFG, β, auxiliary update, EMA, frozen parameters, soft
embedding mode) keeps using `config.distill`; only what is new lives here.
"""

from __future__ import annotations

import ml_collections


def default_gan_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_steps = 10_000
    c.batch_size = 64  # global; real and fake batches have this size each
    c.seed = 1
    # Generator loss = L_DiMO + w_gan * non-saturating GAN loss. 200 in the long MaskBit run
    # (the Di[M]O loss is summed over positions, hence the large weight).
    c.w_gan = 200.0
    c.w_dimo = 1.0  # 0 reproduces the 'GAN only' ablation (degrades, SPEC §1.3)
    # Corruption of real and fake inputs: r ~ U[0, r_max] of positions set to MASK.
    c.r_max = 0.95
    # Relaxation of the generator's sample fed to the teacher: 'soft' (the method) or
    # 'gumbel_st' (the ablation baseline); temperature tau. Overrides config.distill.soft.
    c.soft_mode = "soft"
    c.soft_tau = 1.0
    c.ablation_soft_mode = "gumbel_st"  # what the gumbel_gan stage uses instead
    # Generator optimiser (AdamW as in Soft-Di[M]O's MaskBit run); the auxiliary keeps
    # config.distill's optimiser settings.
    c.gen_optimizer = "adamw"
    c.gen_lr = 5e-7
    c.gen_weight_decay = 0.01
    c.gen_warmup_steps = 100
    c.gen_grad_clip = 1.0
    # Discriminator heads (models/discriminator.py). Tap layers are indices into the
    # teacher's per-layer features (negative from the end); not published, so ours.
    c.disc_layers = (-1,)
    c.disc_hidden = 256
    c.disc_r_embed = 32
    c.disc_lr = 1e-4
    c.disc_b1 = 0.0
    c.disc_b2 = 0.99
    c.disc_grad_clip = 0.0  # <= 0 disables
    # Regulariser: 'none', 'r1' (gamma/2 * E||grad_feat D(real)||^2) or 'lecam'.
    c.disc_reg = "lecam"
    c.r1_gamma = 1.0
    c.lecam_weight = 0.1
    c.lecam_decay = 0.99
    c.log_every = 50
    c.ckpt_every = 1000
    return c


def default_reward_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_steps = 2_000
    c.batch_size = 64
    c.seed = 2
    # L = w_dimo * L_DiMO - w * sum_i lambda_i R_i(Dec(soft bits), c)
    c.w = 1.0
    c.w_dimo = 1.0
    # {registered reward name: lambda} or {name: {"weight": lambda, **factory options}}.
    # Built-in: 'digits_classifier_logprob' (option: temperature).
    c.rewards = ml_collections.ConfigDict({"digits_classifier_logprob": 1.0})
    # The reward reported in every metrics row (`reward` field), whatever is trained on.
    c.eval_rewards = ml_collections.ConfigDict({"digits_classifier_logprob": 1.0})
    c.soft_mode = "soft"
    c.soft_tau = 1.0
    c.gen_optimizer = "adamw"
    c.gen_lr = 5e-7
    c.gen_weight_decay = 0.01
    c.gen_warmup_steps = 100
    c.gen_grad_clip = 1.0
    c.log_every = 50
    c.ckpt_every = 1000
    return c


def default_tteo_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.steps = 2  # K SGD steps on the generator's input embeddings (SPEC: 2 or 4)
    c.lr = 0.2  # plain SGD, no clipping
    c.best_of = 1  # N candidates per image (<= 16); 1 = no selection
    # Selection score for best-of-N: 'reward' (the optimised reward) or 'reward_confidence'
    # (reward + mean max-probability of the generator: prefers confident, clean samples).
    c.select = "reward"
    c.confidence_weight = 1.0
    c.rewards = ml_collections.ConfigDict({"digits_classifier_logprob": 1.0})
    c.soft_mode = "soft"
    c.soft_tau = 1.0
    c.output = "hard"  # 'hard' tokens (argmax/sample of the optimised logits) or 'soft' decode
    c.eval_steps = (2, 4)  # the K values the tteo stage evaluates (rows tteo_k{K}@1)
    return c


def add_digits_refine_configs(c: ml_collections.ConfigDict, preset: str = "") -> None:
    """Adds config.gan / config.reward / config.tteo with the digits sizes (call from
    configs/digits.py before c.lock()). The digits models are tiny and the phases short,
    so learning rates are far above the 5e-7 of the ImageNet run; w_gan is scaled by the
    number of (sub-)token positions (32 here vs 512 for MaskBit 16x16x2), since the
    Di[M]O loss it balances is summed over positions."""
    g = default_gan_config()
    g.update(dict(num_steps=400, batch_size=64, w_gan=12.5, gen_lr=3e-5, gen_warmup_steps=20,
                  disc_layers=(0, -1), disc_hidden=128, disc_lr=2e-4, log_every=100, ckpt_every=400))
    # The classifier is near-certain on the student's samples (log p ~ -1e-3), where the
    # plain log-probability has almost no gradient: train on a tempered one (T = 5).
    tempered = {"digits_classifier_logprob": {"weight": 1.0, "temperature": 5.0}}
    r = default_reward_config()
    r.update(dict(num_steps=300, batch_size=64, w=5.0, gen_lr=1e-5, gen_warmup_steps=20,
                  log_every=100, ckpt_every=300))
    r.rewards = ml_collections.ConfigDict(tempered)
    t = default_tteo_config()
    t.rewards = ml_collections.ConfigDict(tempered)
    if preset == "smoke":
        g.update(dict(num_steps=3, batch_size=16, log_every=1, ckpt_every=3, disc_hidden=16))
        r.update(dict(num_steps=3, batch_size=16, log_every=1, ckpt_every=3))
    c.gan, c.reward, c.tteo = g, r, t
