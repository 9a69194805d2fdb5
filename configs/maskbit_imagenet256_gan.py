"""Soft-Di[M]O GAN refinement of the distilled 14-bit MaskBit (ImageNet 256), SPEC §1.3.

Runs after configs/maskbit_imagenet256_distill.py in the same workdir:

    python -m softdimo_jax.main --config=configs/maskbit_imagenet256_gan.py \\
        --workdir=gs://BUCKET/dimo_maskbit14 \\
        --config.teacher_checkpoint=gs://BUCKET/ckpt/gen14 --config.tokenizer_checkpoint=gs://BUCKET/ckpt/tok14

Generator: L = L_DiMO + w_GAN · non-saturating GAN loss with w_GAN = 200 (the Di[M]O loss
is summed over 256×2 sub-token positions, hence the large weight), AdamW lr 5e-7, weight
decay 0.01 (Soft-Di[M]O's long MaskBit run). Real ImageNet images (tfds, prepared
`imagenet2012`) are encoded by the frozen tokenizer inside the step; real and fake inputs
get r ~ U[0, 0.95] of their tokens replaced by MASK (zero bits) before the frozen teacher.
Discriminator heads, taps and their optimiser are not published: ours are light MLP heads
on teacher layers 6, 12, 18 and 24 (1-based), Adam(0, 0.99) lr 1e-4, LeCam regulariser.
`--config.gan.soft_mode=gumbel_st` is the Gumbel straight-through ablation.
"""

from __future__ import annotations

import ml_collections

from softdimo_jax.core.defaults import default_gan_config
from softdimo_jax.runtime.config_files import sibling_config_module


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    # config.distill is replaced by the distillation run's saved settings at run time
    # (pipelines.at_scale.with_distill_settings): its state is restored. Only where it runs
    # (distill.num_devices / fsdp) and empty checkpoint paths are this run's own.
    c = sibling_config_module(__file__, "maskbit_imagenet256_distill")["get_config"](preset).copy_and_resolve_references()
    c.unlock()
    c.pipeline = "gan"  # GAN refinement of the distilled state in the same workdir
    c.data = ml_collections.ConfigDict(dict(name="imagenet2012", split="train", data_dir="", image_size=256))

    g = default_gan_config()
    g.num_steps = 20_000
    g.batch_size = 64 * 8  # GLOBAL, like the distillation run
    g.w_gan = 200.0
    g.w_dimo = 1.0
    g.r_max = 0.95
    g.soft_mode = "soft"
    g.gen_optimizer = "adamw"
    g.gen_lr = 5e-7
    g.gen_weight_decay = 0.01
    g.gen_warmup_steps = 100
    g.gen_grad_clip = 1.0
    g.disc_layers = (5, 11, 17, 23)
    g.disc_hidden = 256
    g.disc_lr = 1e-4
    g.disc_reg = "lecam"
    g.log_every = 100
    g.ckpt_every = 2000
    c.gan = g
    c.lock()
    return c
