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

from softdimo_jax.training.distill_config import digits_distill_config
from softdimo_jax.training.refine_config import add_digits_refine_configs
from softdimo_jax.training.teacher_config import default_teacher_train_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
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
