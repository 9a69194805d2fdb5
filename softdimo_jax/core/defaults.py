"""Default config blocks of every phase (ml_collections), with the values of the reference
implementations. Configs embed them (`config.distill`, `config.gan`, `config.reward`,
`config.tteo`, `config.teacher.train`) and override what differs for their scale, so every
config has the same keys; presets (digits, ImageNet, text-to-image) live in configs/.

- distillation (SPEC §1.1, §1.2): the reference is Di[M]O distilling MaskGIT;
- GAN refinement, reward fine-tuning, TTEO (SPEC §1.3–1.5): only what is new lives in their
  blocks; the Di[M]O part of the GAN and reward phases keeps using `config.distill`;
- teacher training: MaskBit's ImageNet recipe.
"""

from __future__ import annotations

import ml_collections

# Logical names of the parameter groups the reference keeps frozen in the generator and the
# auxiliary. Each model adapter maps them to its own parameter paths (for LFQBert:
# input_proj, prediction/bias, pos_emb). Raw '/'-joined parameter paths are accepted too.
REFERENCE_FROZEN = ("input_embedding", "output_bias", "position_embedding")


def default_distill_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Schedule and batch.
    c.num_steps = 50_000  # reference: 50k iterations (MaskGIT)
    c.batch_size = 64  # GLOBAL batch; the reference runs 64 per GPU
    c.seed = 0

    # 1. Initial state of the one-step generator.
    c.r_init = 0.6  # fraction of positions set to MASK (exact count round(r_init*L) per sample)
    c.sigma_init = 0.1  # e <- sigma*eps + sqrt(1-sigma^2)*e on the input embeddings
    # 'position': a masked position has MASK in every split (MaskBit: the token is unknown);
    # 'split': each split draws its own exact-count positions.
    c.init_mask_mode = "position"

    # 2. Generator sampling.
    c.gen_temperature = 1.0  # x_theta ~ Cat(softmax(z_theta / T_gen))

    # 3. Forward masking of the generator's sample (the teacher's training schedule).
    c.mask_schedule = "arccos"  # r = arccos(u) / (pi/2); also 'cosine', 'linear'
    c.mask_mode = "position"  # 'position' (all splits together) or 'split' (independent per split)

    # 4. Teacher with classifier-free guidance.
    # 'uncond_plus': z_u + w (z_c - z_u)   (MaskGIT, Di[M]O; w = 2.0)
    # 'cond_plus':   z_c + s (z_c - z_u)   (MaskBit / MaskGen code bases)
    c.cfg_formula = "uncond_plus"
    c.cfg_scale = 2.0
    c.teacher_temperature = 1.0  # p_T = softmax(z_T / this); 1.0 in the reference

    # 5. Generalised Jeffreys divergence: beta=0 forward KL (released configs), 1 reverse KL.
    c.beta = 0.0

    # 7. Auxiliary model.
    c.aux_label_smoothing = 0.1

    # Dropout rate inside generator and auxiliary (the reference leaves 0.1 active in all
    # three networks; our teacher always runs deterministically).
    c.dropout = 0.1
    # PRNG of those dropout masks: 'threefry' (same masks on any mesh) or 'rbg' (XLA's
    # RngBitGenerator: cheaper, masks may depend on sharding / XLA version).
    c.dropout_rng = "threefry"

    # 8. EMA of the generator: rate = min(ema_max, (1 + step) / (10 + step)).
    c.ema_max = 0.9999

    # Optimisers (same settings for generator and auxiliary unless aux_lr is set).
    c.optimizer = "adam"  # 'adam' or 'adamw'
    c.lr = 1e-5
    c.aux_lr = -1.0  # < 0: same as lr
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-6
    c.weight_decay = 0.0  # adamw only (Soft-Di[M]O long MaskBit run: 0.01 with lr 5e-7)
    c.warmup_steps = 100  # linear warm-up, constant after
    c.grad_clip = 1.0  # global-norm clip; <= 0 disables

    # Parameters that never move in generator and auxiliary (logical names or raw paths).
    c.frozen = REFERENCE_FROZEN

    # Soft embeddings (SPEC §1.2) for the soft one-step decode and the post-training phases.
    c.soft = ml_collections.ConfigDict()
    c.soft.mode = "soft"  # 'soft' (expectation), 'gumbel', 'gumbel_st', 'st' (argmax straight-through)
    c.soft.tau = 1.0

    # One-step sampling of the student.
    c.sample = ml_collections.ConfigDict()
    c.sample.temperature = 1.0  # hard tokens ~ Cat(softmax(z / t)); 0 = argmax
    c.sample.use_ema = True

    # Scale.
    c.num_devices = -1  # -1: every device JAX sees
    c.fsdp = 1  # size of the 'fsdp' mesh axis (1 = pure data parallel)
    c.compute_dtype = "float32"  # 'bfloat16': bf16 compute, f32 master weights
    c.remat = False  # gradient checkpointing of the transformer layers
    # XLA:CPU's memory-optimised schedule for the step (lower peak memory, ~10-30% slower;
    # what bench/distill_step.py --lean measures). No effect on accelerators.
    c.cpu_memory_schedule = False

    # Bookkeeping (used by the stage runner).
    c.log_every = 50
    c.ckpt_every = 1000
    c.keep_checkpoints = 2
    c.eval_samples = 1000
    return c


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
    # L = w_dimo * L_DiMO - w_reward * sum_i lambda_i R_i(Dec(soft bits), c)
    c.w_reward = 1.0
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


def default_teacher_train_config(**overrides) -> ml_collections.ConfigDict:
    """MaskBit's ImageNet recipe (global batch 256, AdamW, warm-up + cosine, EMA); keyword
    overrides replace values (unknown keys raise)."""
    c = ml_collections.ConfigDict(dict(
        num_steps=1_350_000,
        batch_size=256,  # global
        learning_rate=1e-4,
        warmup_steps=5_000,
        weight_decay=0.045,
        b1=0.9,
        b2=0.96,
        grad_clip=1.0,
        label_smoothing=0.1,
        class_dropout=0.1,
        mask_schedule="arccos",
        ema_decay=0.9999,
        # Decay min(ema_decay, (1+step)/(10+step)): no trace of the random init in the EMA.
        ema_warmup=True,
        checkpoint_every=10_000,
        log_every=50,
    ))
    unknown = sorted(set(overrides) - set(c.keys()))
    if unknown:
        raise KeyError(f"unknown teacher.train keys {unknown}; valid: {sorted(c.keys())}")
    c.update(overrides)
    return c
