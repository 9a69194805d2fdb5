"""Di[M]O / Soft-Di[M]O distillation of the released 14-bit MaskBit (ImageNet 256).

    python -m softdimo_jax.convert --model maskbit_generator --bits 14 maskbit_generator_14bit.bin ckpt/gen14
    python -m softdimo_jax.convert --model maskbit_tokenizer --bits 14 maskbit_tokenizer_14bit.bin ckpt/tok14
    python -m softdimo_jax.main --config=configs/maskbit_imagenet256_distill.py \\
        --workdir=gs://BUCKET/dimo_maskbit14 \\
        --config.teacher_checkpoint=gs://BUCKET/ckpt/gen14 --config.tokenizer_checkpoint=gs://BUCKET/ckpt/tok14
    launch/tpu_train.sh (TPU pods) and launch/gpu_train.sh (GPU hosts) run the same command.

Presets (`--config=...:NAME`):
  dimo  (default) Di[M]O's recipe (SPEC §1.1): Adam(0.9, 0.999, eps 1e-6), lr 1e-5 for θ and ψ,
        100 warm-up steps then constant, clip 1.0, r_init 0.6, σ 0.1, β 0 (forward KL),
        T_gen 1, aux label smoothing 0.1, dropout 0.1 in θ/ψ, EMA min(0.9999, (1+s)/(10+s)),
        50k steps at 64 per device (the reference: 64 per GPU).
  long  Soft-Di[M]O's long MaskBit run: AdamW with weight decay 0.01, lr 5e-7.
Scale: bf16 compute with float32 master weights, remat of the 24 layers, FSDP over the
'fsdp' mesh axis (`--config.distill.fsdp=4`) for the ~305M-parameter θ, ψ, EMA and Adam
moments; the teacher is a frozen, sharded argument of the step.

MaskBit specifics: CFG in MaskBit's form c + s(c − u) (`cfg_formula='cond_plus'`). The
Di[M]O code base guides MaskGIT as u + w(c − u) with w = 2; with 'cond_plus' the same
guided logits are s = w − 1 = 1.0, which is the default here. MaskBit trains with each split
masked independently, so the forward mask is per split; the initial state masks whole
tokens (all splits), see softdimo_jax/core/dimo.py.
"""

from __future__ import annotations

import ml_collections

from softdimo_jax.core.defaults import default_distill_config


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    preset = preset or "dimo"
    c = ml_collections.ConfigDict()
    c.pipeline = "distill"  # the softdimo_jax.pipelines entry that python -m softdimo_jax.main runs
    c.preset = preset
    # Written by `python -m softdimo_jax.convert` (orbax + the module config).
    c.teacher_checkpoint = ""
    c.tokenizer_checkpoint = ""
    c.grid_samples = 16
    c.grid_labels = (1, 7, 282, 604, 724, 179, 751, 404, 850, 88, 207, 279, 388, 417, 980, 972)

    d = default_distill_config()
    d.num_steps = 50_000
    d.batch_size = 64 * 8  # GLOBAL: 64 per device on a v4-16 / 8-GPU host; scale with devices
    d.cfg_formula = "cond_plus"
    d.cfg_scale = 1.0  # = u + 2.0 (c - u), Di[M]O's w = 2
    d.mask_mode = "split"
    d.init_mask_mode = "position"
    d.compute_dtype = "bfloat16"
    d.remat = True
    d.fsdp = 1
    d.log_every = 100
    d.ckpt_every = 2000
    d.keep_checkpoints = 3
    if preset == "long":
        d.optimizer = "adamw"
        d.weight_decay = 0.01
        d.lr = 5e-7
        d.aux_lr = 5e-7
    elif preset != "dimo":
        raise ValueError(f"unknown preset {preset!r}; use 'dimo' (default) or 'long'")
    c.distill = d
    c.lock()
    return c
