"""The at-scale pipelines: one phase per command, from converted PyTorch checkpoints, on
TPU pods or GPU hosts (launch/tpu_train.sh, launch/gpu_train.sh), all through

    python -m softdimo_jax.main --config=configs/<config>.py --workdir=gs://BUCKET/run

`config.pipeline` names the phase:
  teacher  MaskBit teacher training on a tfds image set with a frozen converted tokenizer
           (configs/maskbit_imagenet256_teacher.py);
  distill  Di[M]O from a converted teacher; the family comes from the checkpoint: MaskBit
           (configs/maskbit_imagenet256_distill.py), MaskGIT with the taming VQGAN
           (configs/maskgit_imagenet256_distill.py) or MaskGen from a prompt file with the
           OpenCLIP text tower and TA-TiTok (configs/maskgen_t2i_distill.py), or Meissonic from
           precomputed prompt embeddings (configs/meissonic_t2i_distill.py);
  gan      Soft-Di[M]O GAN refinement of the distilled MaskBit state in the same workdir
           (configs/maskbit_imagenet256_gan.py);
  reward   reward fine-tuning of the GAN-refined (or distilled) MaskBit state in the same
           workdir (configs/maskbit_imagenet256_reward.py).
Every process runs the same program (the distillation is data-free: each step draws its
own labels and tokens on device); only process 0 writes logs, grids and metrics.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.core import objectives
from softdimo_jax.core import reward as rewards
from softdimo_jax.core.adapters import make_adapter
from softdimo_jax.core.dimo import Distiller, generator_params
from softdimo_jax.core.gan import GanRefiner
from softdimo_jax.data import prompts, tfds_images
from softdimo_jax.data.clip_bpe import ClipBPETokenizer
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.models.maskgen import MaskGenVQ
from softdimo_jax.models.maskgit import MaskGITTransformer
from softdimo_jax.models.meissonic import MeissonicTransformer
from softdimo_jax.pipelines import meissonic_t2i, phases, report
from softdimo_jax.pipelines.context import SeedOffsets
from softdimo_jax.runtime import artifacts, checkpointing
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.artifacts import fingerprint, log, to_jsonable
from softdimo_jax.runtime.converted import family_of, load_converted
from softdimo_jax.sampling.batching import class_ordered_labels
from softdimo_jax.sampling.maskgen_sampler import encode_captions, one_step_images
from softdimo_jax.sampling.maskgit_sampler import one_step_sample
from softdimo_jax.sampling.student import sample_student_images

# --------------------------------------------------------------------------- teacher


def teacher(config, workdir: str):
    """Teacher training on a tfds image dataset with a frozen converted tokenizer. Returns
    the final Trainer state."""
    if not config.tokenizer_checkpoint:
        raise ValueError("set --config.tokenizer_checkpoint to a `softdimo_jax.convert` tokenizer directory")
    tokenizer, tok_params = load_converted(config.tokenizer_checkpoint)
    size = int(config.data.image_size)
    grid = size // tokenizer.downsample_factor
    model = objectives.teacher_from_config(config.teacher.model, grid * grid, tokenizer.num_bits)
    source = tfds_images.TfdsImageSource(config.data.name, config.data.split,
                                         config.data.data_dir or None, image_size=size)
    batch_fn = tfds_images.make_batch_fn(source, int(config.teacher.train.batch_size), config.seed)
    mesh = meshlib.make_mesh(config.mesh.num_devices or None, fsdp=config.mesh.fsdp)
    state, _ = phases.train_teacher(
        model, config.teacher.train, batch_fn, os.path.join(workdir, "teacher"), tokenizer=tokenizer,
        frozen={"tokenizer": tok_params}, mesh=mesh, fsdp=config.mesh.fsdp > 1, seed=config.seed,
        keep=config.checkpoint.keep, config_json=fingerprint(config, "data", "tokenizer", "teacher"),
    )
    return state


# --------------------------------------------------------------------------- distill


def distill_mesh(dcfg):
    return meshlib.make_mesh(None if dcfg.num_devices in (-1, 0, None) else dcfg.num_devices, dcfg.fsdp)


def load_teacher_and_tokenizer(config):
    """(teacher model, params, (tokenizer model, params) or (None, None)) from the config's
    converted checkpoints, in the distillation's compute dtype and remat setting."""
    dcfg = config.distill
    if not config.teacher_checkpoint:
        raise ValueError(
            "config.teacher_checkpoint is empty: convert the PyTorch generator first "
            "(python -m softdimo_jax.convert --model maskbit_generator --bits 14 SRC DST) and pass "
            "--config.teacher_checkpoint=DST"
        )
    model, params = load_converted(config.teacher_checkpoint, dtype=dcfg.compute_dtype, remat=bool(dcfg.remat))
    tok = (None, None)
    if config.get("tokenizer_checkpoint"):
        tok = load_converted(config.tokenizer_checkpoint)
    return model, params, tok


def check_family(config, model) -> None:
    """config.teacher_family (when set) must name the converted teacher's family."""
    want = config.get("teacher_family") or ""
    have = family_of(model)
    if want and have != want:
        raise ValueError(
            f"config.teacher_family is {want!r} but config.teacher_checkpoint holds a {have!r} model; "
            "pass the checkpoint converted for this config (or the config of that family)"
        )


def load_text_encoder(config):
    """(clip_model, clip_params, BPE tokenizer) from config.text_encoder_checkpoint / bpe_merges."""
    if not config.get("text_encoder_checkpoint"):
        raise ValueError(
            "config.text_encoder_checkpoint is empty: convert the OpenCLIP ViT-L-14-336 text tower "
            "(python -m softdimo_jax.convert --model clip_text SRC DST) and pass "
            "--config.text_encoder_checkpoint=DST"
        )
    clip, clip_params = load_converted(config.text_encoder_checkpoint)
    tok = ClipBPETokenizer(config.get("bpe_merges") or None, context_length=clip.context_length)
    return clip, clip_params, tok


def maskgit_student_images(model, params, vqgan, vq_params, labels, dcfg, seed: int, soft: bool, mesh=None):
    """One-step MaskGIT student images (N, H, W, 3) in [0, 1]: sampled ids, or softmax of the
    visual-token logits (temperature dcfg.soft.tau) @ the VQGAN codebook when soft.
    With `mesh` the output is replicated over it, so every host can read it (multi-host)."""
    g, k = model.grid_size, model.codebook_size
    temp = float(dcfg.sample.temperature) or 1.0

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

    run = jax.jit(run, out_shardings=None if mesh is None else meshlib.replicated(mesh))
    return np.asarray(run(params, vq_params, jax.random.PRNGKey(seed), jnp.asarray(labels, jnp.int32)))


def distill(config, workdir: str) -> None:
    """Distills a converted teacher (config.teacher_checkpoint), exports the MaskBit student
    and writes one-step sample grids (hard and soft) when a tokenizer checkpoint is given."""
    dcfg = config.distill
    mesh = distill_mesh(dcfg)
    if meissonic_t2i.uses_random_models(config):
        model, params, (tok_model, tok_params) = meissonic_t2i.random_models(config)
    else:
        model, params, (tok_model, tok_params) = load_teacher_and_tokenizer(config)
    check_family(config, model)
    stage_dir = os.path.join(workdir, "distill")
    seed = int(dcfg.seed) + SeedOffsets.STUDENT_ROWS
    n = int(config.get("grid_samples", 16))
    fp = to_jsonable(config)
    adapter, batch_fn, conds = None, None, None
    if isinstance(model, MaskGenVQ):
        clip, clip_params, bpe = load_text_encoder(config)
        table = prompts.load_prompt_conditions(
            config.get("prompt_file", ""), clip, clip_params, bpe, null_prompt=config.get("null_prompt", ""),
            chunk=int(config.get("prompt_encode_chunk", 64)))
        log(f"[distill] {len(table)} captions on this host (process {jax.process_index()})")
        adapter = make_adapter(model, dcfg, **prompts.null_conditions_kwargs(table))
        batch_fn = table.batch_fn(int(dcfg.batch_size), int(dcfg.seed))
        # The grid shows the file's first captions, the same on every host (the table is
        # this host's share).
        conds = encode_captions(clip, clip_params, bpe, prompts.read_prompts(config.prompt_file)[:n])
    elif isinstance(model, MeissonicTransformer):
        table = meissonic_t2i.prompt_table(config, model)
        log(f"[distill] {len(table)} prompt embeddings on this host (process {jax.process_index()})")
        adapter = make_adapter(model, dcfg, **prompts.null_conditions_kwargs(table))
        batch_fn = table.batch_fn(int(dcfg.batch_size), int(dcfg.seed))
        conds = meissonic_t2i.grid_conditions(config, model, n)
    result, distiller = phases.train_distill(dcfg, model, params, stage_dir, mesh, fingerprint=fp,
                                             adapter=adapter, batch_fn=batch_fn)
    if isinstance(model, MeissonicTransformer):
        student = phases.export_student(stage_dir, "meissonic_transformer", model,
                                        generator_params(result.state, dcfg.sample.use_ema))
        log(f"[distill] student weights -> {student}")
    if tok_model is None or n <= 0:
        log("[distill] no tokenizer_checkpoint or grid_samples = 0: skipping the sample grid")
        return
    gen = generator_params(result.state, dcfg.sample.use_ema)
    for mode in ("hard", "soft"):
        path_name = f"student_{mode}"
        if isinstance(model, LFQBert):
            if mode == "hard":
                log(f"[distill] student weights -> {phases.export_student(stage_dir, 'maskbit_generator', model, gen)}")
            k = max(n, mesh.size)
            k -= k % mesh.size
            labels = np.asarray(config.get("grid_labels") or class_ordered_labels(k, model.num_classes))[:k]
            images = sample_student_images(model, gen, tok_model, tok_params, dcfg, labels, mode,
                                           distiller.mesh, len(labels), seed=seed)
        elif isinstance(model, MaskGITTransformer):
            labels = np.resize(np.asarray(config.get("grid_labels") or range(n), np.int32), n) % model.nclass
            images = maskgit_student_images(model, gen, tok_model, tok_params, labels, dcfg, seed, mode == "soft",
                                            mesh=mesh)
        elif isinstance(model, MaskGenVQ):
            run = jax.jit(lambda g, t, c, r, soft=mode == "soft": one_step_images(
                model, g, tok_model, t, c, r, float(dcfg.get("aesthetic_score", 6.5)), r_init=float(dcfg.r_init),
                sigma=float(dcfg.sigma_init), temperature=float(dcfg.sample.temperature), soft=soft)[0],
                out_shardings=meshlib.replicated(mesh))
            images = np.asarray(run(gen, tok_params, conds, jax.random.PRNGKey(seed)))
        elif isinstance(model, MeissonicTransformer):
            run = jax.jit(lambda g, t, c, r, soft=mode == "soft": meissonic_t2i.one_step_images(
                model, g, tok_model, t, c, r, dcfg, soft), out_shardings=meshlib.replicated(mesh))
            images = np.asarray(run(gen, tok_params, conds, jax.random.PRNGKey(seed)))
        else:
            raise NotImplementedError(f"no one-step grid for {type(model).__name__}")
        artifacts.save_grid(stage_dir, path_name, images, nrow=None)
    write_local_report(workdir)


# --------------------------------------------------------------------------- GAN


def gan(config, workdir: str) -> None:
    """GAN refinement of a distilled MaskBit: the converted teacher / tokenizer, the
    finished distillation state in <workdir>/distill (same config.distill), real images
    from tfds (config.data); writes <workdir>/gan."""
    dcfg, gcfg = config.distill, config.gan
    mesh = distill_mesh(dcfg)
    model, teacher_params, (tok_model, tok_params) = load_teacher_and_tokenizer(config)
    if tok_model is None:
        raise ValueError("the GAN phase encodes real images: set --config.tokenizer_checkpoint")
    adapter = make_adapter(model, dcfg)
    refiner = GanRefiner(adapter, dcfg, gcfg, mesh, tokenizer=tok_model)
    # One placed copy of the teacher serves the restore target, the init and every step.
    teacher_params = refiner.distiller.place_teacher(teacher_params)
    dimo_state = checkpointing.load_latest_state(
        os.path.join(workdir, "distill"), Distiller(adapter, dcfg, mesh).abstract_state(teacher_params),
        name="distill")
    source = tfds_images.TfdsImageSource(config.data.name, config.data.split, config.data.data_dir or None,
                                         image_size=int(config.data.image_size))
    init = lambda s, tp: refiner.init_state(jax.random.PRNGKey(int(gcfg.seed)), s, tp)
    phases.train_refinement(
        "gan", refiner, init, (dimo_state, teacher_params), gcfg, os.path.join(workdir, "gan"),
        batch_fn=tfds_images.make_batch_fn(source, int(gcfg.batch_size), int(gcfg.seed)),
        frozen={"teacher": teacher_params, "tokenizer": tok_params}, keep=int(dcfg.keep_checkpoints),
        fingerprint=to_jsonable(config))


# --------------------------------------------------------------------------- reward


def refinement_start(config, workdir: str, source: str, adapter, teacher_params, tokenizer, mesh):
    """The DistillState a refinement phase starts from: the finished state of the
    `source` phase ('distill' or 'gan') in this workdir, restored onto the mesh."""
    dcfg = config.distill
    abstract = Distiller(adapter, dcfg, mesh).abstract_state(teacher_params)
    if source == "distill":
        return checkpointing.load_latest_state(os.path.join(workdir, "distill"), abstract, name="distill")
    if source == "gan":
        refiner = GanRefiner(adapter, dcfg, config.gan, mesh, tokenizer=tokenizer)
        shapes = jax.eval_shape(lambda s, tp: refiner.init_state(jax.random.PRNGKey(0), s, tp), abstract,
                                teacher_params)
        target = meshlib.abstract_with_shardings(
            shapes, meshlib.params_shardings(mesh, shapes, refiner.distiller.fsdp))
        return checkpointing.load_latest_state(os.path.join(workdir, "gan"), target, name="gan").dimo
    raise ValueError(f"reward.source must be 'gan' or 'distill', got {source!r}")


def reward(config, workdir: str) -> None:
    """Reward fine-tuning of the refined MaskBit (config.reward.source in this workdir), with
    the rewards named in config.reward.rewards; writes <workdir>/reward, exports the EMA
    generator to <workdir>/reward/student and a one-step grid."""
    dcfg, rcfg = config.distill, config.reward
    spec = {name: w for name, w in rcfg.rewards.items() if w}
    if not spec:
        raise ValueError(
            f"every weight of config.reward.rewards is 0 ({dict(rcfg.rewards)}); set one, e.g. "
            f"--config.reward.rewards.{next(iter(rcfg.rewards), 'NAME')}=1.0")
    mesh = distill_mesh(dcfg)
    model, teacher_params, (tok_model, tok_params) = load_teacher_and_tokenizer(config)
    if tok_model is None:
        raise ValueError("reward fine-tuning decodes soft images: set --config.tokenizer_checkpoint")
    if not isinstance(model, LFQBert):
        raise NotImplementedError(f"at-scale reward fine-tuning runs on MaskBit teachers; got {type(model).__name__}")
    adapter = make_adapter(model, dcfg)
    teacher_params = Distiller(adapter, dcfg, mesh).place_teacher(teacher_params)
    start = refinement_start(config, workdir, str(rcfg.source), adapter, teacher_params, tok_model, mesh)
    rset = rewards.build_reward_set(spec)
    grid = int(config.data.image_size) // tok_model.downsample_factor
    refiner = rewards.RewardRefiner(adapter, dcfg, rcfg, tok_model, rset, (grid, grid), mesh)
    stage_dir = os.path.join(workdir, "reward")
    result = phases.train_refinement(
        "reward", refiner, refiner.init_state, (start,), rcfg, stage_dir, batch_fn=lambda step: None,
        frozen={"teacher": teacher_params, "tokenizer": tok_params, "reward": rset.params},
        keep=int(dcfg.keep_checkpoints), fingerprint=to_jsonable(config))
    gen = generator_params(result.state, dcfg.sample.use_ema)
    log(f"[reward] generator weights -> {phases.export_student(stage_dir, 'maskbit_generator', model, gen)}")
    k = max(int(config.get("grid_samples", 16)), mesh.size)
    k -= k % mesh.size
    labels = np.asarray(config.get("grid_labels") or class_ordered_labels(k, model.num_classes))[:k]
    images = sample_student_images(model, gen, tok_model, tok_params, dcfg, labels, "hard", mesh, len(labels),
                                   seed=int(dcfg.seed) + SeedOffsets.STUDENT_ROWS)
    artifacts.save_grid(stage_dir, "student_hard", images, nrow=None)
    write_local_report(workdir)


def write_local_report(workdir: str) -> None:
    """The report (summary.png, results.md) of the grids so far; on a remote workdir, run
    `python -m softdimo_jax.report` over a local copy instead."""
    if artifacts.is_remote(workdir):
        log(f"[report] {workdir} is remote: copy it and run python -m softdimo_jax.report on the copy")
        return
    log("[report] " + ", ".join(report.write_report(workdir)))
