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
           a prompt file with its text tower or precomputed prompt embeddings
           (configs/meissonic_t2i_distill.py);
  gan      Soft-Di[M]O GAN refinement of the distilled MaskBit state in the same workdir
           (configs/maskbit_imagenet256_gan.py);
  reward   reward fine-tuning of the GAN-refined (or distilled) MaskBit state in the same
           workdir (configs/maskbit_imagenet256_reward.py).
The refinements take the distillation settings from the distillation run's saved config
(`with_distill_settings`). Every distillation / refinement stage exports its EMA student
as a converted checkpoint, <workdir>/<stage>/student (model.json names the family and the
stage), that `python -m softdimo_jax.sample` and `... evaluate --generator` load.
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
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.models.maskgen import MaskGenVQ
from softdimo_jax.models.meissonic import MeissonicTransformer
from softdimo_jax.pipelines import meissonic_t2i, phases, report
from softdimo_jax.pipelines.context import SeedOffsets
from softdimo_jax.runtime import artifacts, checkpointing
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.artifacts import fingerprint, log, to_jsonable
from softdimo_jax.runtime.converted import family_of, load_converted
from softdimo_jax.runtime.errors import BadInput
from softdimo_jax.sampling import api
from softdimo_jax.sampling.batching import class_ordered_labels

# --------------------------------------------------------------------------- teacher


def teacher(config, workdir: str):
    """Teacher training on a tfds image dataset with a frozen converted tokenizer. Returns
    the final Trainer state."""
    if not config.tokenizer_checkpoint:
        raise BadInput("config.tokenizer_checkpoint is empty — set --config.tokenizer_checkpoint to a "
                       "`softdimo_jax.convert` tokenizer directory")
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
        family = config.get("teacher_family") or ""
        how = {"maskbit_generator": "--model maskbit_generator --bits 14",
               "maskgit_transformer": "--model maskgit_transformer",
               "maskgen_vq": "--model maskgen_vq"}.get(family, f"--model FAMILY (one of maskbit_generator, "
                                                            "maskgit_transformer, maskgen_vq)")
        raise BadInput(
            "config.teacher_checkpoint is empty — convert the PyTorch teacher first "
            f"(python -m softdimo_jax.convert {how} SRC DST) and pass --config.teacher_checkpoint=DST"
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
        raise BadInput(
            f"config.teacher_family is {want!r} but config.teacher_checkpoint holds a {have!r} model — "
            "pass the checkpoint converted for this config (or the config of that family)"
        )


def load_text_encoder(config):
    """(clip_model, clip_params, BPE tokenizer) from config.text_encoder_checkpoint / bpe_merges."""
    if not config.get("text_encoder_checkpoint"):
        raise BadInput(
            "config.text_encoder_checkpoint is empty — convert the OpenCLIP ViT-L-14-336 text tower "
            "(python -m softdimo_jax.convert --model clip_text SRC DST) and pass "
            "--config.text_encoder_checkpoint=DST"
        )
    clip, clip_params = load_converted(config.text_encoder_checkpoint)
    return clip, clip_params, prompts.clip_tokenizer(config.get("bpe_merges") or None, clip.context_length)


def grid_conditions(config, gen: api.Generator, captions=None) -> api.Conditions:
    """The rows of a stage's one-step grid: config.grid_labels (refused when out of the
    model's range), else class-ordered labels, for `grid_samples` images; the given captions
    for a text generator."""
    n = int(config.get("grid_samples", 16))
    if gen.spec.conditioning == "text":
        return api.make_conditions(gen, captions=list(captions)[:n])
    num_classes = gen.spec.num_classes(gen.model)
    labels = config.get("grid_labels") or class_ordered_labels(n, num_classes)
    return api.Conditions(labels=api.check_labels(np.asarray(labels)[:n], num_classes, "config.grid_labels"))


def export_one_step_student(stage: str, config, stage_dir: str, model, gen_params) -> dict:
    """Exports a stage's EMA student (`<stage_dir>/student`) with the one-step settings that
    `sample` / `evaluate` read (r_init, σ, …; Meissonic's token grid and micro-conditions) and
    returns those settings. Float32 without remat: runtime fields, the sampler picks its dtype."""
    settings = api.student_settings_from_config(config.distill)
    where = phases.export_student(stage_dir, family_of(model), model.clone(dtype=jnp.float32, remat=False),
                                  gen_params, stage=stage, sampling=settings)
    log(f"[{stage}] student weights -> {where}")
    return settings


def student_outputs(stage: str, config, stage_dir: str, model, gen_params, tok_model, tok_params, mesh,
                    text=None, captions=None, modes=("hard", "soft")) -> None:
    """What every distillation / refinement stage leaves: its EMA student exported as a
    converted checkpoint (`<stage_dir>/student`, model.json naming family and stage) and,
    with a tokenizer, one-step grids `student_<mode>.png` through the sampling API."""
    dcfg = config.distill
    family = family_of(model)
    settings = export_one_step_student(stage, config, stage_dir, model, gen_params)
    if tok_model is None:
        log(f"[{stage}] no tokenizer_checkpoint: skipping the sample grid")
        return
    gen = api.Generator(family, model, gen_params, tok_model, tok_params, text, {"sampling": settings})
    conds = grid_conditions(config, gen, captions)
    for mode in modes:
        images, _ = api.generate(gen, conds, kind="student", mode=mode, seed=int(dcfg.seed) + SeedOffsets.STUDENT_ROWS,
                                 batch_size=len(conds), mesh=mesh, dtype=dcfg.compute_dtype)
        artifacts.save_grid(stage_dir, f"student_{mode}", images, nrow=None)


def distill(config, workdir: str) -> None:
    """Distills a converted teacher (config.teacher_checkpoint), exports the EMA student of
    any family (<workdir>/distill/student) and writes one-step sample grids (hard and soft)
    when a tokenizer checkpoint is given."""
    dcfg = config.distill
    mesh = distill_mesh(dcfg)
    if meissonic_t2i.uses_random_models(config):
        model, params, (tok_model, tok_params) = meissonic_t2i.random_models(config)
    else:
        model, params, (tok_model, tok_params) = load_teacher_and_tokenizer(config)
    check_family(config, model)
    stage_dir = os.path.join(workdir, "distill")
    n = int(config.get("grid_samples", 16))
    fp = to_jsonable(config)
    adapter, batch_fn, text, captions = None, None, None, None
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
        text = api.TextEncoder(clip, clip_params, bpe)
        captions = prompts.read_prompts(config.prompt_file)[:n]
    elif isinstance(model, MeissonicTransformer):
        table = meissonic_t2i.prompt_table(config, model)
        log(f"[distill] {len(table)} prompt embeddings on this host (process {jax.process_index()})")
        adapter = make_adapter(model, dcfg, **prompts.null_conditions_kwargs(table))
        batch_fn = table.batch_fn(int(dcfg.batch_size), int(dcfg.seed))
    result, distiller = phases.train_distill(dcfg, model, params, stage_dir, mesh, fingerprint=fp,
                                             adapter=adapter, batch_fn=batch_fn)
    gen = generator_params(result.state, dcfg.sample.use_ema)
    if isinstance(model, MeissonicTransformer):
        meissonic_outputs(config, stage_dir, model, gen, tok_model, tok_params, distiller.mesh, n)
    else:
        student_outputs("distill", config, stage_dir, model, gen, tok_model, tok_params, distiller.mesh, text, captions)
    write_local_report(workdir)


def meissonic_outputs(config, stage_dir: str, model, gen_params, tok_model, tok_params, mesh, n: int) -> None:
    """Meissonic's student export (with the settings `sample` / `evaluate` read: r_init, σ, token
    grid, micro-conditions) and one-step grids: conditions from the prompt table, so the grid
    needs no text tower when the prompts came precomputed."""
    dcfg = config.distill
    export_one_step_student("distill", config, stage_dir, model, gen_params)
    if tok_model is None or n <= 0:
        log("[distill] no tokenizer_checkpoint or grid_samples = 0: skipping the sample grid")
        return
    conds = meissonic_t2i.grid_conditions(config, model, n)
    seed = int(dcfg.seed) + SeedOffsets.STUDENT_ROWS
    for mode in ("hard", "soft"):
        run = jax.jit(lambda g, t, c, r, soft=mode == "soft": meissonic_t2i.one_step_images(
            model, g, tok_model, t, c, r, dcfg, soft), out_shardings=meshlib.replicated(mesh))
        images = np.asarray(run(gen_params, tok_params, conds, jax.random.PRNGKey(seed)))
        artifacts.save_grid(stage_dir, f"student_{mode}", images, nrow=None)


# --------------------------------------------------------------------------- GAN


# Distillation settings that may differ in a later stage: where it runs, not what it trained.
PLACEMENT_KEYS = frozenset({"num_devices", "fsdp"})


def _to_config_value(current, saved):
    """A saved JSON value in the type of the config field it replaces (JSON lists -> tuples)."""
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(saved)
    if isinstance(current, float) and isinstance(saved, int) and not isinstance(saved, bool):
        return float(saved)
    return saved


def _apply_saved(block, saved: dict, prefix: str, changed: list) -> None:
    for key, value in saved.items():
        if key not in block:
            continue  # a key this version no longer has
        current = block[key]
        if hasattr(current, "items") and isinstance(value, dict):
            _apply_saved(current, value, f"{prefix}{key}.", changed)
            continue
        new = _to_config_value(current, value)
        if new != current:
            changed.append(f"{prefix}{key}: {current!r} -> {new!r}")
            block[key] = new


def saved_run_config(workdir: str, stage: str = "distill") -> dict | None:
    """The config a finished stage of this workdir stored with its latest checkpoint, or None."""
    manager = checkpointing.open_manager(os.path.join(workdir, stage))
    try:
        step = manager.latest_step()
        meta = None if step is None else checkpointing.read_meta(manager, step)
    finally:
        manager.close()
    saved = meta.get("config") if isinstance(meta, dict) else None
    if isinstance(saved, dict) and set(saved) == {"config", "upstream"}:
        saved = saved["config"]  # a refinement stage's identity: its config + upstream identities
    return saved if isinstance(saved, dict) else None


def with_distill_settings(config, workdir: str, phase: str, *, gan: bool = False):
    """`config` with the distillation settings (config.distill, and the teacher / tokenizer
    checkpoints when left empty) of the distillation run in this workdir, read from its
    saved config: a refinement restores that run's state, so its settings must be the
    run's, not repeated by hand. Where it runs (num_devices, fsdp) stays this run's. With
    `gan`, config.gan likewise comes from the GAN run (a reward run starting from it)."""
    saved = saved_run_config(workdir, "distill")
    if saved is None:
        raise BadInput(f"[{phase}] no finished distillation in {os.path.join(workdir, 'distill')} — run the "
                       "distill config in this --workdir first")
    config = config.copy_and_resolve_references()
    config.unlock()
    changed: list[str] = []
    for key in ("teacher_checkpoint", "tokenizer_checkpoint"):
        if not config.get(key) and saved.get(key):
            config[key] = saved[key]
            changed.append(f"{key} -> {saved[key]!r}")
    distill = {k: v for k, v in (saved.get("distill") or {}).items() if k not in PLACEMENT_KEYS}
    _apply_saved(config.distill, distill, "distill.", changed)
    if gan:
        saved_gan = saved_run_config(workdir, "gan")
        if saved_gan is None or "gan" not in saved_gan:
            raise BadInput(f"[{phase}] no finished GAN run in {os.path.join(workdir, 'gan')} — run the gan config "
                           "in this --workdir first, or set --config.reward.source=distill")
        _apply_saved(config.gan, saved_gan["gan"], "gan.", changed)
    config.lock()
    if changed:
        log(f"[{phase}] from the earlier runs' saved configs: " + "; ".join(changed))
    return config


def gan(config, workdir: str) -> None:
    """GAN refinement of a distilled MaskBit: the converted teacher / tokenizer, the
    finished distillation state in <workdir>/distill (whose saved config gives
    config.distill), real images from tfds (config.data); writes <workdir>/gan, exports
    the EMA student to <workdir>/gan/student and one-step grids."""
    config = with_distill_settings(config, workdir, "gan")
    dcfg, gcfg = config.distill, config.gan
    mesh = distill_mesh(dcfg)
    model, teacher_params, (tok_model, tok_params) = load_teacher_and_tokenizer(config)
    if tok_model is None:
        raise ValueError("the GAN phase encodes real images: set --config.tokenizer_checkpoint")
    if not isinstance(model, LFQBert):
        raise NotImplementedError(f"at-scale GAN refinement runs on MaskBit teachers; got {type(model).__name__}")
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
    stage_dir = os.path.join(workdir, "gan")
    result = phases.train_refinement(
        "gan", refiner, init, (dimo_state, teacher_params), gcfg, stage_dir,
        batch_fn=tfds_images.make_batch_fn(source, int(gcfg.batch_size), int(gcfg.seed)),
        frozen={"teacher": teacher_params, "tokenizer": tok_params}, keep=int(dcfg.keep_checkpoints),
        fingerprint=stage_identity(config, workdir, "distill"))
    gen = generator_params(result.state.dimo, dcfg.sample.use_ema)
    student_outputs("gan", config, stage_dir, model, gen, tok_model, tok_params, mesh)
    write_local_report(workdir)


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
    """Reward fine-tuning of the refined MaskBit (config.reward.source in this workdir; the
    distillation settings come from that run's saved config), with the rewards named in
    config.reward.rewards; writes <workdir>/reward, exports the EMA generator to
    <workdir>/reward/student and a one-step grid."""
    rcfg = config.reward
    spec = {name: w for name, w in rcfg.rewards.items() if w}
    if not spec:
        raise ValueError(
            f"every weight of config.reward.rewards is 0 ({dict(rcfg.rewards)}); set one, e.g. "
            f"--config.reward.rewards.{next(iter(rcfg.rewards), 'NAME')}=1.0")
    config = with_distill_settings(config, workdir, "reward", gan=str(config.reward.source) == "gan")
    dcfg = config.distill
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
        keep=int(dcfg.keep_checkpoints), fingerprint=stage_identity(config, workdir, str(rcfg.source)))
    gen = generator_params(result.state, dcfg.sample.use_ema)
    student_outputs("reward", config, stage_dir, model, gen, tok_model, tok_params, mesh, modes=("hard",))
    write_local_report(workdir)


def stage_identity(config, workdir: str, upstream: str) -> dict:
    """A refinement stage's identity: its whole config plus the identity stored with the
    checkpoints of the stage it starts from (so a retrained source invalidates it)."""
    return {"config": to_jsonable(config),
            "upstream": {upstream: checkpointing.stored_identity(os.path.join(workdir, upstream))}}


def write_local_report(workdir: str) -> None:
    """The report (summary.png, results.md) of the grids so far; on a remote workdir, run
    `python -m softdimo_jax.report` over a local copy instead."""
    if artifacts.is_remote(workdir):
        log(f"[report] {workdir} is remote: copy it and run python -m softdimo_jax.report on the copy")
        return
    log("[report] " + ", ".join(report.write_report(workdir)))
