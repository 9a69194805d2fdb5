"""The stand-alone distillation entry (`softdimo_jax.training.distill_stage`) for the MaskGIT
and MaskGen teachers: model loading beyond the teacher, the conditions pipeline and the
one-step sample grid of each family. MaskBit keeps its own path in distill_stage.

MaskGIT: class-conditional like MaskBit; the grid decodes the student's tokens (hard) and
its expected codebook latents (soft) with the converted taming VQGAN.
MaskGen: the converted OpenCLIP text tower and the BPE tokenizer encode this host's share of
`config.prompt_file` once (softdimo_jax.data.prompts); every step gets this host's rows of
the batch's conditions; the CFG branch uses `config.null_prompt`'s encoding. The grid decodes
one-step images of the first captions with the converted TA-TiTok.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable

import functools

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax import parallel
from softdimo_jax.training import distill


def is_lfq(model) -> bool:
    from softdimo_jax.models.maskbit_bert import LFQBert

    return isinstance(model, LFQBert)


def check_family(config, model) -> None:
    """config.teacher_family (when set) must name the converted teacher's family."""
    want = config.get("teacher_family") or ""
    if not want:
        return
    from softdimo_jax.convert import family_of

    have = family_of(model)
    if have != want:
        raise ValueError(
            f"config.teacher_family is {want!r} but config.teacher_checkpoint holds a {have!r} model; "
            "pass the checkpoint converted for this config (or the config of that family)"
        )


def _save_grid(images, path: str) -> None:
    if jax.process_index() != 0:
        return
    from softdimo_jax.sampling.grid import make_image_grid, save_image_grid

    if not path.startswith("gs://"):
        save_image_grid(images, path)
        return
    import tensorflow as tf
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(make_image_grid(images)).save(buf, format="PNG")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buf.getvalue())


def maskgit_student_images(model, params, vqgan, vq_params, labels, dcfg, seed: int, soft: bool, mesh=None):
    """One-step MaskGIT student images (N, H, W, 3) in [0, 1]: sampled ids, or softmax of the
    visual-token logits (temperature dcfg.soft.tau) @ the VQGAN codebook when soft.
    With `mesh` the output is replicated over it, so every host can read it (multi-host)."""
    from softdimo_jax.sampling.maskgit_sampler import one_step_sample

    g, k = model.grid_size, model.codebook_size
    temp = float(dcfg.sample.temperature) or 1.0

    @functools.partial(jax.jit, out_shardings=None if mesh is None else parallel.replicated(mesh))
    def run(params, vq_params, rng, labels):
        ids, logits = one_step_sample(model, params, rng, labels, r_init=dcfg.r_init, sigma=dcfg.sigma_init,
                                      gen_temp=temp, return_logits=True)
        v = {"params": vq_params}
        if soft:
            probs = jax.nn.softmax(logits[..., :k] / float(dcfg.soft.tau), axis=-1)
            img = vqgan.apply(v, probs.reshape(-1, g, g, k), method=type(vqgan).decode_soft)
        else:
            img = vqgan.apply(v, ids.reshape(-1, g, g), method=type(vqgan).decode_tokens)
        return jnp.clip(img, 0.0, 1.0)

    return np.asarray(run(params, vq_params, jax.random.PRNGKey(seed), jnp.asarray(labels, jnp.int32)))


def load_text_encoder(config):
    """(clip_model, clip_params, BPE tokenizer) from config.text_encoder_checkpoint / bpe_merges."""
    from softdimo_jax.convert import load_converted
    from softdimo_jax.data.clip_bpe import ClipBPETokenizer

    if not config.get("text_encoder_checkpoint"):
        raise ValueError(
            "config.text_encoder_checkpoint is empty: convert the OpenCLIP ViT-L-14-336 text tower "
            "(python -m softdimo_jax.convert --model clip_text SRC DST) and pass "
            "--config.text_encoder_checkpoint=DST"
        )
    clip, clip_params = load_converted(config.text_encoder_checkpoint)
    tok = ClipBPETokenizer(config.get("bpe_merges") or None, context_length=clip.context_length)
    return clip, clip_params, tok


def run_family(config, workdir: str, mesh, model, params, tok_model, tok_params,
               train_distill: Callable, fingerprint: Any, log: Callable[[str], None]) -> None:
    """Trains the MaskGIT / MaskGen student from a converted teacher and writes its grids."""
    from softdimo_jax.models.maskgen import MaskGenVQ
    from softdimo_jax.models.maskgit import MaskGITTransformer

    dcfg = config.distill
    stage_dir = os.path.join(workdir, "distill")
    seed = int(dcfg.seed) + 2000
    n = int(config.get("grid_samples", 16))

    if isinstance(model, MaskGITTransformer):
        result, _ = train_distill(dcfg, model, params, stage_dir, mesh, fingerprint=fingerprint)
        if tok_model is None:
            log("[distill] no tokenizer_checkpoint: skipping the sample grid")
            return
        gen = result.state.ema_params if dcfg.sample.use_ema else result.state.gen_params
        labels = np.resize(np.asarray(config.get("grid_labels") or range(n), np.int32), n) % model.nclass
        for mode in ("hard", "soft"):
            images = maskgit_student_images(model, gen, tok_model, tok_params, labels, dcfg, seed, mode == "soft",
                                            mesh=mesh)
            _save_grid(images, os.path.join(stage_dir, f"student_{mode}.png"))
        return

    if isinstance(model, MaskGenVQ):
        from softdimo_jax.data import prompts
        from softdimo_jax.sampling.maskgen_sampler import encode_captions, one_step_images

        clip, clip_params, bpe = load_text_encoder(config)
        table = prompts.load_prompt_conditions(
            config.get("prompt_file", ""), clip, clip_params, bpe, null_prompt=config.get("null_prompt", ""),
            chunk=int(config.get("prompt_encode_chunk", 64)))
        log(f"[distill] {len(table)} captions on this host (process {jax.process_index()})")
        adapter = distill.make_adapter(model, dcfg, **prompts.null_conditions_kwargs(table))
        result, _ = train_distill(dcfg, model, params, stage_dir, mesh, fingerprint=fingerprint,
                                  adapter=adapter, batch_fn=table.batch_fn(int(dcfg.batch_size), int(dcfg.seed)))
        if tok_model is None:
            log("[distill] no tokenizer_checkpoint (TA-TiTok): skipping the sample grid")
            return
        gen = result.state.ema_params if dcfg.sample.use_ema else result.state.gen_params
        # The file's first captions, the same on every host (the table is this host's share);
        # images replicated over the mesh so every host can read them.
        conds = encode_captions(clip, clip_params, bpe, prompts.read_prompts(config.prompt_file)[:n])
        for mode in ("hard", "soft"):
            run = jax.jit(lambda g, t, c, r, soft=mode == "soft": one_step_images(
                model, g, tok_model, t, c, r, float(dcfg.get("aesthetic_score", 6.5)), r_init=float(dcfg.r_init),
                sigma=float(dcfg.sigma_init), temperature=float(dcfg.sample.temperature), soft=soft)[0],
                out_shardings=parallel.replicated(mesh))
            images = run(gen, tok_params, conds, jax.random.PRNGKey(seed))
            _save_grid(np.asarray(images), os.path.join(stage_dir, f"student_{mode}.png"))
        return

    raise NotImplementedError(f"no distillation entry for {type(model).__name__}")
