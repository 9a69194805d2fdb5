"""The embedded default: the whole pipeline on scikit-learn's digits (no download).

    python -m softdimo_jax.main --workdir=/tmp/digits                       # this config
    python -m softdimo_jax.main --config=configs/digits.py:smoke --workdir=DIR   # seconds
    python -m softdimo_jax.main --workdir=DIR --config.teacher.train.num_steps=3000

Sizes chosen so every stage runs in minutes on 2 CPU cores:
- images 16×16×1 (digits' 8×8 upsampled bilinearly), values in [0, 1];
- tokenizer: MaskBit's ConvVQModel with hidden 32, channel_mult (1, 1, 1) -> two stride-2
  stages -> 4×4 = 16 tokens of 12 bits (4096 codes) in 2 splits of 6 bits (V = 64 per split);
- teacher: LFQBert hidden 128, depth 3, heads 4, MLP 512 over 16 tokens + class token;
- evaluation: a small CNN classifier; FD-digits on its 64-d penultimate features.
The same field names as `configs/maskbit.py` (ImageNet) for the model sub-configs.
"""

from __future__ import annotations

import ml_collections

from softdimo_jax.core.defaults import (default_distill_config, default_gan_config, default_reward_config,
                                       default_teacher_train_config, default_tteo_config)


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pipeline = "digits"  # softdimo_jax.pipelines: every stage on the embedded digits set
    c.seed = 0
    c.preset = preset or "default"

    c.data = dict(name="digits", image_size=16, channels=1)
    # num_devices 0 = every device JAX sees; fsdp > 1 shards large arrays over that many.
    c.mesh = dict(num_devices=0, fsdp=1)
    c.checkpoint = dict(keep=2)

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.model = dict(
        num_bits=12,
        hidden_channels=32,  # GroupNorm(32) needs multiples of 32
        channel_mult=(1, 1, 1),
        num_res_blocks=1,
        num_channels=1,
        sample_with_conv=True,
        dtype="float32",
    )
    c.tokenizer.train = dict(
        num_steps=1200,
        batch_size=32,
        learning_rate=2e-3,
        warmup_steps=100,
        weight_decay=1e-4,
        grad_clip=1.0,
        recon_loss="l2",
        # MaskBit's LFQ losses, as released.
        commitment_cost=0.25,
        entropy_loss_weight=0.02,
        entropy_loss_temperature=0.01,
        entropy_gamma=1.0,
        checkpoint_every=200,
        log_every=50,
    )

    c.teacher = ml_collections.ConfigDict()
    c.teacher.model = dict(
        splits=2,
        hidden_dim=128,
        depth=3,
        heads=4,
        mlp_dim=512,
        num_classes=10,
        dropout=0.1,
        use_prenorm=False,
        dtype="float32",
        remat=False,
    )
    # lr 3e-3 and 4,000 steps: teacher@16 FD-digits 8.0 with the sampler below (at 2,500
    # steps: lr 1e-3 11.1, 2e-3 9.1, 3e-3 8.7, 5e-3 8.9).
    c.teacher.train = default_teacher_train_config(
        num_steps=4000, batch_size=64, learning_rate=3e-3, warmup_steps=200, weight_decay=0.03,
        ema_decay=0.999, checkpoint_every=500, log_every=100,
    )
    # Teacher sampling for the evaluation rows (MaskBit's sampler; steps vary per row).
    c.sampler = dict(
        guidance_scale=1.0,
        guidance_annealing="cosine",
        scale_pow=3.0,
        # Gumbel noise on the confidence that picks which tokens to fix: 6.0 gave the best
        # FD-digits on the digits teacher (4.0: more precision, less recall; 8.0: the reverse).
        randomize_temperature=6.0,
        softmax_temperature=1.0,
        use_sampling_annealing=False,
        mask_schedule="arccos",
        use_ema=True,
    )

    c.classifier = dict(
        num_classes=10,
        width=32,
        feature_dim=64,
        image_size=16,
        num_steps=500,
        batch_size=64,
        learning_rate=2e-3,
        warmup_steps=50,
        weight_decay=1e-4,
        max_shift=2,
        log_every=200,
    )

    c.evaluation = dict(
        num_samples=1000,  # generated images per row (balanced over classes)
        teacher_steps=(1, 2, 4, 8, 16),
        batch_size=500,
        pr_k=3,
        grid_samples=100,
    )

    # Di[M]O distillation of the teacher into a one-step generator (SPEC §1.1).
    c.distill = digits_distill_config(smoke=(preset == "smoke"))
    # GAN refinement, reward fine-tuning and TTEO (SPEC §1.3-1.5); handles `smoke` itself.
    add_digits_refine_configs(c, preset)

    if preset == "smoke":
        _smoke(c)
    elif preset not in ("", "default"):
        raise ValueError(f"unknown digits preset {preset!r}; use '' (default) or 'smoke'")
    c.lock()
    return c


def _smoke(c: ml_collections.ConfigDict) -> None:
    """Same pipeline, tiny sizes and a handful of steps: runs in seconds (tests)."""
    c.tokenizer.train.num_steps = 4
    c.tokenizer.train.batch_size = 16
    c.tokenizer.train.checkpoint_every = 2
    c.tokenizer.train.log_every = 2
    c.teacher.model.update(hidden_dim=32, depth=1, heads=2, mlp_dim=64)
    c.teacher.train.update(num_steps=4, batch_size=16, checkpoint_every=2, log_every=2, warmup_steps=1)
    c.classifier.update(num_steps=4, batch_size=32, log_every=2, warmup_steps=1)
    c.evaluation.update(num_samples=40, teacher_steps=(1, 2), batch_size=40, grid_samples=20)


def digits_distill_config(smoke: bool = False) -> ml_collections.ConfigDict:
    """`config.distill` for the embedded digits pipeline.

    Tuned on the digits teacher: 800 iterations at batch 64, generator lr 1e-4 (the
    reference 1e-5 is for 50k steps) and auxiliary lr 1e-3: the auxiliary must track the
    moving generator, and with the same lr it lagged (recall 0.21, FD-digits 16.8 vs 8.6 with
    10x; 3x gave 9.7). MaskBit's CFG form c + s(c - u) with s = 0.5 (s = 0 cost FD),
    per-split forward masking as the MaskBit teacher was trained, no dropout in θ/ψ (the
    digits teacher is small; dropout only slowed convergence). sigma_init 0.3 or r_init 0.8
    did not help (FD 19.1, 18.1 at equal learning rates).
    """
    c = default_distill_config()
    c.update(dict(
        num_steps=800, batch_size=64, lr=1e-4, aux_lr=1e-3, warmup_steps=50, dropout=0.0,
        cfg_formula="cond_plus", cfg_scale=0.5, mask_mode="split",
        log_every=100, ckpt_every=400, keep_checkpoints=2,
    ))
    if smoke:
        c.update(dict(num_steps=2, batch_size=16, warmup_steps=1, log_every=1, ckpt_every=1))
    return c


def add_digits_refine_configs(c: ml_collections.ConfigDict, preset: str = "") -> None:
    """Adds config.gan / config.reward / config.tteo with the digits sizes (before
    c.lock()). The digits models are tiny and the phases short,
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
    r.update(dict(num_steps=300, batch_size=64, w_reward=5.0, gen_lr=1e-5, gen_warmup_steps=20,
                  log_every=100, ckpt_every=300))
    r.rewards = ml_collections.ConfigDict(tempered)
    t = default_tteo_config()
    t.rewards = ml_collections.ConfigDict(tempered)
    if preset == "smoke":
        g.update(dict(num_steps=3, batch_size=16, log_every=1, ckpt_every=3, disc_hidden=16))
        r.update(dict(num_steps=3, batch_size=16, log_every=1, ckpt_every=3))
    c.gan, c.reward, c.tteo = g, r, t
