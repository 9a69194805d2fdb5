"""Hyperparameters of teacher (MDM) training with MaskBit's objective
(`softdimo_jax.training.teacher_train`). Configs embed this as `config.teacher.train` and
override what differs for their scale, so every config has the same keys."""

from __future__ import annotations

import ml_collections


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
