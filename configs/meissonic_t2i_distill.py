"""Di[M]O text-to-image distillation of Meissonic (1024 px, 64x64 tokens) from a prompt file.

    python -m softdimo_jax.convert --model meissonic_transformer MEISSONIC/transformer ckpt/meissonic
    python -m softdimo_jax.convert --model meissonic_vqvae MEISSONIC/vqvae ckpt/meissonic_vq
    python -m softdimo_jax.convert --model meissonic_text MEISSONIC/text_encoder ckpt/meissonic_text
    python -m softdimo_jax.main --config=configs/meissonic_t2i_distill.py \\
        --workdir=gs://BUCKET/dimo_meissonic --config.prompt_file=gs://BUCKET/prompts.txt \\
        --config.text_encoder_checkpoint=ckpt/meissonic_text \\
        --config.teacher_checkpoint=ckpt/meissonic --config.tokenizer_checkpoint=ckpt/meissonic_vq
    # or from precomputed embeddings: --config.prompt_embeddings=gs://BUCKET/prompts_clip_h.npz
    # smoke test, random tiny models and random conditions (~1 min of CPU, mostly XLA compiles):
    python -m softdimo_jax.main --config=configs/meissonic_t2i_distill.py:tiny --workdir=/tmp/meissonic_tiny

Conditions, one of:
- `prompt_file` (one caption per line) + `text_encoder_checkpoint` (the converted CLIP-ViT-H-14
  tower, `meissonic_text`; `bpe_merges` defaults to the packaged CLIP BPE file): each host
  encodes its share of the captions (line i goes to host i mod process_count) once at start,
  in jitted chunks of `prompt_encode_chunk` split over its devices with the frozen tower
  passed as an argument, plus `negative_prompt` (Di[M]O's `distil_neg_prompt`) for the CFG
  branch; the ids are padded with the end token and the transformer reads hidden_states[-2]
  and the pooled projection, as Meissonic's pipeline calls transformers'
  CLIPTextModelWithProjection;
- `prompt_embeddings`: an .npz of those embeddings precomputed (softdimo_jax.data.prompt_embeddings):
  per prompt `encoder_hidden_states` (N, 77, 1024) = hidden_states[-2] and `pooled_projections`
  (N, 1024) = `text_embeds`, plus the negative prompt's `negative_encoder_hidden_states` /
  `negative_pooled_projections`; each host keeps its share of the rows.
Each host feeds its rows of every batch. The `tiny` preset needs neither: it draws random
conditions and builds random tiny models when no checkpoint is given.

Hyperparameters: Di[M]O's Meissonic run (SPEC §1.1; DIMO_Meissonic.yaml / train_DIMO_Meissonic.py):
r_init 0.5 (`fixed_ratio`), σ 0.3 (`noise_emb_perturb` fix_0.3, applied after the embedding
block's 1x1 conv), teacher CFG uncond + 4·(cond − uncond) over the negative prompt (`true_cfg`
4), auxiliary without CFG (`fake_cfg_eval` 1, no condition dropout), forward mask 'cosine'
(`ratio_mode`), β = 0 (`Jeffreys_0.`), temperatures 1, lr 1e-6 for θ and ψ, Adam(0.9, 0.999),
eps 1e-6 under bf16, no weight decay, 100 warm-up steps then constant, clip 1.0, EMA 0.9999,
20k steps, gradient checkpointing, frozen embedding block and MLM head (`fix_emb_layer`),
micro-conditions (1024, 1024, 0, 0, 6) and timestep 0 in every call. The batch is the
reference's 4 per GPU (global = 4 × devices). Soft inputs p @ E enter before the embedding
block's RMSNorm (the norm after the expectation; MeissonicAdapter.embed_soft).
"""

from __future__ import annotations

import ml_collections

from softdimo_jax.core.defaults import default_distill_config
from softdimo_jax.models.meissonic import DIMO_NEGATIVE_PROMPT

# Di[M]O's negative prompt (the teacher's CFG branch): encoded with the prompts, or into the .npz's negative_* arrays.
NEGATIVE_PROMPT = DIMO_NEGATIVE_PROMPT
# Di[M]O's fix_emb_layer: the embedding block and the MLM head stay frozen in θ and ψ.
MEISSONIC_FROZEN = ("input_embedding", "output_head")


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    preset = preset or "dimo"
    if preset not in ("dimo", "tiny"):
        raise ValueError(f"unknown preset {preset!r}; use 'dimo' (default) or 'tiny'")
    tiny = preset == "tiny"
    c = ml_collections.ConfigDict()
    c.pipeline = "distill"  # the softdimo_jax.pipelines entry that python -m softdimo_jax.main runs
    c.preset = preset
    c.teacher_family = "meissonic_transformer"
    c.teacher_checkpoint = ""  # converted Meissonic transformer/ folder
    c.tokenizer_checkpoint = ""  # converted Meissonic vqvae/ folder (the sample grid); optional
    c.prompt_file = ""  # captions, one per line, encoded at start by text_encoder_checkpoint
    c.text_encoder_checkpoint = ""  # converted Meissonic text_encoder/ folder (meissonic_text)
    c.bpe_merges = ""  # CLIP BPE merges; "" = $SOFTDIMO_CLIP_BPE or the packaged copy
    c.negative_prompt = NEGATIVE_PROMPT  # the teacher's CFG branch (with prompt_file)
    c.prompt_encode_chunk = 64  # captions per jitted text-tower call (rounded up to the device count)
    c.prompt_embeddings = ""  # or: .npz of precomputed CLIP-H prompt embeddings (see the docstring)
    c.grid_samples = 4 if tiny else 16  # first prompts of the file, one-step student images

    # Random tiny models and conditions when no checkpoint / .npz is given (the tiny preset only).
    c.random_init = tiny
    c.random_prompts = 8  # rows of random conditions
    c.random_text_len = 6
    t = ml_collections.ConfigDict()  # MeissonicTransformer fields of the random teacher
    t.num_layers, t.num_single_layers = 1, 1
    t.attention_head_dim, t.num_attention_heads, t.axes_dims_rope = 8, 2, (2, 2, 4)
    t.joint_attention_dim, t.pooled_projection_dim = 12, 16
    t.codebook_size, t.vocab_size = 16, 17
    c.random_transformer = t
    v = ml_collections.ConfigDict()  # MeissonicVQModel fields of the random decoder
    v.block_out_channels, v.layers_per_block, v.latent_channels = (8, 8), 1, 4
    v.norm_num_groups, v.num_vq_embeddings = 4, 16
    c.random_vq = v

    d = default_distill_config()
    d.num_steps = 4 if tiny else 20_000
    d.batch_size = 8 if tiny else 4 * 8  # GLOBAL: the reference's 4 per GPU; scale with devices
    d.token_grid = (4, 4) if tiny else (64, 64)  # 1024 px / the VQ's f16
    d.micro_conds = (1024.0, 1024.0, 0.0, 0.0, 6.0)
    d.r_init = 0.5
    d.sigma_init = 0.3
    d.init_mask_mode = "position"
    d.mask_schedule = "cosine"
    d.mask_mode = "position"
    d.cfg_formula = "uncond_plus"  # Meissonic / Di[M]O: u + s (c − u)
    d.cfg_scale = 4.0
    d.beta = 0.0
    d.gen_temperature = 1.0
    d.teacher_temperature = 1.0
    d.aux_label_smoothing = 0.1
    d.dropout = 0.0  # Meissonic has no dropout
    d.optimizer = "adam"
    d.lr = 1e-3 if tiny else 1e-6  # tiny: large enough that a few steps move the weights
    d.aux_lr = 1e-3 if tiny else 1e-6
    d.b1, d.b2, d.eps, d.weight_decay = 0.9, 0.999, 1e-6, 0.0
    d.warmup_steps = 1 if tiny else 100
    d.grad_clip = 1.0
    d.ema_max = 0.9999
    d.frozen = MEISSONIC_FROZEN
    d.compute_dtype = "float32" if tiny else "bfloat16"
    d.remat = not tiny
    d.log_every = 1 if tiny else 100
    d.ckpt_every = 2 if tiny else 1000
    d.keep_checkpoints = 3
    d.sample.temperature = 1.0
    c.distill = d
    c.lock()
    return c
