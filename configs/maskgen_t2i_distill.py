"""Di[M]O text-to-image distillation of MaskGen-L VQ from a prompt file.

    python -m softdimo_jax.convert --model maskgen_vq maskgen_vq_l.bin ckpt/maskgen
    python -m softdimo_jax.convert --model tatitok tatitok_bl128_vq.bin ckpt/tatitok
    python -m softdimo_jax.convert --model clip_text open_clip_vit_l_14_336.bin ckpt/clip_text
    python -m softdimo_jax.main --config=configs/maskgen_t2i_distill.py \\
        --workdir=gs://BUCKET/dimo_maskgen --config.prompt_file=gs://BUCKET/prompts.txt \\
        --config.teacher_checkpoint=... --config.text_encoder_checkpoint=... --config.tokenizer_checkpoint=...
    # TPU slice: CONFIG=configs/maskgen_t2i_distill.py launch/tpu_train.sh --config.prompt_file=... ...

Conditions: the prompt file holds one caption per line; each host encodes its share once
with the OpenCLIP text tower (softdimo_jax.data.prompts) and feeds its rows of every batch.
The CFG branch of the teacher uses `null_prompt`'s encoding: by default the negative prompt
of Di[M]O's Meissonic run (`distil_neg_prompt`: "teacher has much better performance with
negative prompt"); `--config.null_prompt=""` gives MaskGen's own null condition (the empty
caption). The auxiliary runs conditional only (the reference's fake_cfg_eval = 1).
The BPE merges come from `bpe_merges`, else $SOFTDIMO_CLIP_BPE, else the package's own copy.

Hyperparameters: Di[M]O's Meissonic values (SPEC §1.1, DIMO_Meissonic.yaml): r_init 0.5,
σ 0.3, lr 1e-6 for generator and auxiliary, Adam(0.9, 0.999), 100 warm-up steps, clip 1.0,
EMA 0.9999, β = 0, 20k steps, gradient checkpointing, bf16 (Adam eps 1e-6 under bf16, as
the reference). Teacher CFG: the reference guides u + 4(c − u) (`true_cfg` 4, u from the
negative prompt), which is MaskGen's form c + s(c − u) with s = 3. Not published for MaskGen and chosen here: the
forward-mask schedule (arccos, MaskGen's; Meissonic's run used its own 'cosine'), the batch
(16 per device = the reference's 2 per GPU × 8 accumulation), aesthetic score 6.5
(MaskGen's sampling value), no dropout (MaskGen has none).
"""

from __future__ import annotations

import ml_collections

from softdimo_jax.core.defaults import REFERENCE_FROZEN, default_distill_config

# The negative prompt of Di[M]O's Meissonic distillation (its teacher's unconditional branch).
NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, signature, "
                   "text, jpeg artifacts, signature, sketch, duplicate, ugly, identifying mark")


def get_config(devices: str = "8") -> ml_collections.ConfigDict:
    n = int(devices or 8)
    c = ml_collections.ConfigDict()
    c.pipeline = "distill"  # the softdimo_jax.pipelines entry that python -m softdimo_jax.main runs
    c.teacher_family = "maskgen_vq"
    c.teacher_checkpoint = ""  # converted maskgen_vq_l.bin
    c.text_encoder_checkpoint = ""  # converted OpenCLIP ViT-L-14-336 text tower (clip_text)
    c.tokenizer_checkpoint = ""  # converted TA-TiTok (for the sample grid); optional
    c.bpe_merges = ""  # bpe_simple_vocab_16e6.txt.gz; "" = $SOFTDIMO_CLIP_BPE or the packaged copy
    c.prompt_file = ""  # one caption per line
    # The CFG branch's caption: Di[M]O's negative prompt; "" = MaskGen's null condition.
    c.null_prompt = NEGATIVE_PROMPT
    c.prompt_encode_chunk = 64
    c.grid_samples = 16  # first captions of this host's share, one-step student images

    d = default_distill_config()
    d.num_steps = 20_000
    d.batch_size = 16 * n
    d.r_init = 0.5
    d.sigma_init = 0.3
    d.init_mask_mode = "position"
    d.mask_schedule = "arccos"
    d.mask_mode = "position"
    d.cfg_formula = "cond_plus"  # MaskGen: c + s (c − u)
    d.cfg_scale = 3.0  # = u + 4 (c − u), the reference's true_cfg 4
    d.beta = 0.0
    d.aux_label_smoothing = 0.1
    d.dropout = 0.0  # MaskGenVQ has no dropout
    d.aesthetic_score = 6.5
    d.optimizer = "adam"
    d.lr = 1e-6
    d.aux_lr = 1e-6
    d.b1, d.b2, d.eps, d.weight_decay = 0.9, 0.999, 1e-6, 0.0
    d.warmup_steps = 100
    d.grad_clip = 1.0
    d.ema_max = 0.9999
    d.frozen = REFERENCE_FROZEN  # embeddings (tied head) and pos_embed; MaskGen has no output bias
    d.compute_dtype = "bfloat16"
    d.remat = True
    d.log_every = 100
    d.ckpt_every = 1000
    d.keep_checkpoints = 3
    d.sample.temperature = 1.0
    c.distill = d
    c.lock()
    return c
