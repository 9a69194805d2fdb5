"""Di[M]O distillation of Di[M]O's MaskGIT teacher (ImageNet 256): the published recipe.

    python -m softdimo_jax.convert --model maskgit_transformer MaskGIT_ImageNet_256.pth ckpt/maskgit
    python -m softdimo_jax.convert --model taming_vqgan last.ckpt ckpt/vqgan
    python -m softdimo_jax.main --config=configs/maskgit_imagenet256_distill.py \\
        --workdir=gs://BUCKET/dimo_maskgit \\
        --config.teacher_checkpoint=gs://BUCKET/ckpt/maskgit --config.tokenizer_checkpoint=gs://BUCKET/ckpt/vqgan
    # TPU slice: CONFIG=configs/maskgit_imagenet256_distill.py TPU_NAME=... ZONE=... WORKDIR=gs://... \\
    #   launch/tpu_train.sh --config.teacher_checkpoint=gs://BUCKET/ckpt/maskgit --config.tokenizer_checkpoint=...

The recipe (SPEC §1.1; Di[M]O's DIMO_MaskGit.yaml and launch script): r_init 0.6 (exact count
of MASKed initial tokens), σ 0.1 on the initial token embeddings, teacher CFG u + 2.0 (c − u)
with the null class, β = 0 (forward KL), arccos forward masking, auxiliary cross-entropy with
label smoothing 0.1, Adam(0.9, 0.999, eps 1e-6 as the reference under bf16, no weight decay) at lr 1e-5 for generator and
auxiliary, 100 linear warm-up steps then constant, clip 1.0, EMA min(0.9999, (1+s)/(10+s)),
64 per device, 50k steps, bf16 compute (the reference's mixed precision), dropout 0.1 in θ/ψ,
remat of the transformer layers (memory for compute: gradients equal up to round-off),
frozen in θ and ψ: the token embedding `tok_emb` (tied with the output head, so the head's
weights stay frozen too), the output `bias` and the position embedding `pos_emb`.
The student's distributions use the K = 1024 visual-token logits (the MASK column dropped).
"""

from __future__ import annotations

import ml_collections

from softdimo_jax.core.defaults import REFERENCE_FROZEN, default_distill_config


def get_config(devices: str = "8") -> ml_collections.ConfigDict:
    """`--config=configs/maskgit_imagenet256_distill.py:N` sets the global batch to 64·N
    (N = devices of the run, default 8)."""
    n = int(devices or 8)
    c = ml_collections.ConfigDict()
    c.pipeline = "distill"  # the softdimo_jax.pipelines entry that python -m softdimo_jax.main runs
    c.teacher_family = "maskgit_transformer"  # checked against the converted checkpoint
    c.teacher_checkpoint = ""  # `python -m softdimo_jax.convert --model maskgit_transformer ...`
    c.tokenizer_checkpoint = ""  # `... --model taming_vqgan ...` (for the sample grid)
    c.grid_samples = 16
    c.grid_labels = (1, 7, 282, 604, 724, 179, 751, 404, 850, 88, 207, 279, 388, 417, 980, 972)

    d = default_distill_config()
    d.num_steps = 50_000
    d.batch_size = 64 * n  # GLOBAL: 64 per device as the reference's 64 per GPU
    d.r_init = 0.6
    d.sigma_init = 0.1
    d.init_mask_mode = "position"
    d.mask_schedule = "arccos"
    d.mask_mode = "position"  # S = 1
    d.cfg_formula = "uncond_plus"  # u + w (c − u)
    d.cfg_scale = 2.0
    d.beta = 0.0
    d.aux_label_smoothing = 0.1
    d.dropout = 0.1
    d.optimizer = "adam"
    d.lr = 1e-5
    d.aux_lr = 1e-5
    d.b1, d.b2, d.eps, d.weight_decay = 0.9, 0.999, 1e-6, 0.0
    d.warmup_steps = 100
    d.grad_clip = 1.0
    d.ema_max = 0.9999
    d.frozen = REFERENCE_FROZEN  # tok_emb (tied head), bias, pos_emb
    d.compute_dtype = "bfloat16"
    # Remat of the 24 layers: without it the step needs 160 GiB of temporaries per chip at 64
    # per chip (a full-depth v5e:4x4 compile); with it 14.8 GiB on v6e:4x4. Same gradients up
    # to round-off, one more forward of θ and ψ. `--config.distill.remat=False` where memory allows.
    d.remat = True
    d.log_every = 100
    d.ckpt_every = 2000
    d.keep_checkpoints = 3
    c.distill = d
    c.lock()
    return c
