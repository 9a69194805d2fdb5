"""Hyperparameters of the Di[M]O / Soft-Di[M]O distillation phase (SPEC §1.1, §1.2).

Every knob of the method is a key here, with the value of the reference implementation
(Di[M]O distilling MaskGIT) as its default. Pipelines embed this as `config.distill` and
override what differs for their teacher, e.g. `--config.distill.lr=5e-7`.
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

    # Bookkeeping (used by the stage runner).
    c.log_every = 50
    c.ckpt_every = 1000
    c.keep_checkpoints = 2
    c.eval_samples = 1000
    return c


def digits_distill_config(smoke: bool = False) -> ml_collections.ConfigDict:
    """`config.distill` for the embedded digits pipeline (configs/digits.py).

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
