"""Each training phase as one Trainer run, shared by the digits pipeline and the at-scale
pipelines: the method's pieces (softdimo_jax.core) bound to the runtime (checkpoints,
logging, the one jitted step). A finished phase is restored, not retrained.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from softdimo_jax.core import objectives
from softdimo_jax.core.adapters import make_adapter
from softdimo_jax.core.dimo import Distiller
from softdimo_jax.runtime import artifacts
from softdimo_jax.runtime.converted import save_converted
from softdimo_jax.runtime.trainer import Trainer, TrainResult, cpu_memory_compiler_options


def train_tokenizer(model_cfg, train_cfg, batch_fn, image_shape, stage_dir, *, mesh=None,
                    seed: int = 0, keep: int = 2, config_json: Any = None, **trainer_kwargs):
    """Trains (or restores) the tokenizer. Returns (model, params, TrainResult)."""
    model = objectives.tokenizer_from_config(model_cfg)
    init_fn, step_fn = objectives.make_tokenizer_phase(model, train_cfg, image_shape)
    trainer = Trainer(
        "tokenizer", stage_dir, init_fn, step_fn, batch_fn, num_steps=train_cfg.num_steps,
        seed=seed, mesh=mesh, checkpoint_every=train_cfg.checkpoint_every, keep=keep,
        log_every=train_cfg.log_every, config_json=config_json, **trainer_kwargs,
    )
    result = trainer.run()
    return model, result.state["params"], result


def teacher_trainer(model, train_cfg, batch_fn, stage_dir, *, tokenizer=None, frozen=None, mesh=None,
                    fsdp: bool = False, seed: int = 0, keep: int = 2, config_json: Any = None,
                    **trainer_kwargs) -> Trainer:
    """The Trainer of the teacher phase (`python -m softdimo_jax.aot` compiles its step)."""
    init_fn, step_fn = objectives.make_teacher_phase(model, train_cfg, tokenizer)
    return Trainer(
        "teacher", stage_dir, init_fn, step_fn, batch_fn, num_steps=train_cfg.num_steps,
        seed=seed, mesh=mesh, fsdp=fsdp, frozen=frozen, checkpoint_every=train_cfg.checkpoint_every,
        keep=keep, log_every=train_cfg.log_every, config_json=config_json, **trainer_kwargs,
    )


def train_teacher(model, train_cfg, batch_fn, stage_dir, *, tokenizer=None, frozen=None,
                  mesh=None, fsdp: bool = False, seed: int = 0, keep: int = 2,
                  config_json: Any = None, **trainer_kwargs):
    """Trains (or restores) the teacher. Returns (state, TrainResult); sample from
    state["ema"] when `ema_decay` > 0."""
    trainer = teacher_trainer(model, train_cfg, batch_fn, stage_dir, tokenizer=tokenizer, frozen=frozen,
                              mesh=mesh, fsdp=fsdp, seed=seed, keep=keep, config_json=config_json,
                              **trainer_kwargs)
    result = trainer.run()
    return result.state, result


def step_compiler_options(dcfg) -> dict | None:
    """The XLA options a distill config asks for (`cpu_memory_schedule`: the memory-optimised
    XLA:CPU schedule that bench/distill_step.py --lean measures; no effect off CPU)."""
    return cpu_memory_compiler_options() if dcfg.get("cpu_memory_schedule", False) else None


def distill_trainer(distiller: Distiller, teacher_params, stage_dir: str | None, *, fingerprint: Any = None,
                    on_step_end=None, batch_fn=None, compiler_options: dict | None = None) -> Trainer:
    """The Trainer of the distillation phase: θ, ψ and the EMA are built from the teacher
    (an init argument), which then travels as the step's `frozen` argument (sharded like
    params, never donated or checkpointed). `batch_fn(step)`: this host's rows of the
    step's conditions batch for text-conditioned adapters; None for class labels drawn in
    the step."""
    dcfg = distiller.config
    # Placed once: the same (possibly FSDP-sharded) buffers serve as init argument and as
    # the frozen argument of every step, instead of a second copy from host arrays.
    teacher_params = distiller.place_teacher(teacher_params)
    return Trainer(
        name="distill",
        stage_dir=stage_dir,
        init_fn=lambda rng, teacher: distiller.init_fn(teacher),
        init_args=(teacher_params,),
        step_fn=distiller.trainer_step_fn(),
        batch_fn=batch_fn if batch_fn is not None else (lambda step: None),
        num_steps=int(dcfg.num_steps),
        seed=int(dcfg.seed),
        mesh=distiller.mesh,
        fsdp=distiller.fsdp,
        frozen={"teacher": teacher_params},
        checkpoint_every=int(dcfg.ckpt_every),
        keep=int(dcfg.keep_checkpoints),
        log_every=int(dcfg.log_every),
        config_json=fingerprint,
        on_step_end=on_step_end,
        compiler_options=compiler_options,
    )


def train_distill(dcfg, teacher_model, teacher_params, stage_dir: str | None, mesh, *,
                  fingerprint: Any = None, on_step_end=None, adapter=None, batch_fn=None
                  ) -> tuple[TrainResult, Distiller]:
    """Runs (or resumes, or restores when complete) the distillation phase.
    `adapter`: a prebuilt adapter (default: core.adapters.make_adapter)."""
    adapter = adapter if adapter is not None else make_adapter(teacher_model, dcfg)
    distiller = Distiller(adapter, dcfg, mesh)
    trainer = distill_trainer(distiller, teacher_params, stage_dir, fingerprint=fingerprint,
                              on_step_end=on_step_end, batch_fn=batch_fn,
                              compiler_options=step_compiler_options(dcfg))
    return trainer.run(), distiller


def refinement_trainer(name: str, refiner, init_fn, init_args: tuple, phase_cfg, stage_dir: str | None, *,
                       batch_fn, frozen: dict, keep: int, fingerprint: Any) -> Trainer:
    """The Trainer of a refinement phase (GAN or reward) of `refiner` (core.gan.GanRefiner /
    core.reward.RewardRefiner) from `init_fn(*init_args)` (the previous phase's state and
    frozen models as jit arguments); `python -m softdimo_jax.aot` compiles its step."""
    return Trainer(
        name=name, stage_dir=stage_dir, init_fn=lambda rng, *args: init_fn(*args), init_args=init_args,
        step_fn=refiner.trainer_step_fn(), batch_fn=batch_fn, num_steps=int(phase_cfg.num_steps),
        seed=int(phase_cfg.seed), mesh=refiner.mesh, fsdp=refiner.distiller.fsdp, frozen=frozen,
        checkpoint_every=int(phase_cfg.ckpt_every), keep=int(keep), log_every=int(phase_cfg.log_every),
        config_json=fingerprint,
    )


def train_refinement(name: str, refiner, init_fn, init_args: tuple, phase_cfg, stage_dir: str, *,
                     batch_fn, frozen: dict, keep: int, fingerprint: Any):
    """Runs (or restores) a refinement phase (see `refinement_trainer`). Returns the TrainResult."""
    trainer = refinement_trainer(name, refiner, init_fn, init_args, phase_cfg, stage_dir, batch_fn=batch_fn,
                                 frozen=frozen, keep=keep, fingerprint=fingerprint)
    return trainer.run()  # run() closes the checkpoint manager and writer itself


def export_student(stage_dir: str, family: str, model, params, *, stage: str | None = None,
                   sampling: dict | None = None) -> str:
    """Writes a one-step generator's (EMA) weights as a converted checkpoint,
    `<stage_dir>/student`, whose model.json names the `family`, the `stage` it came from
    (default: the stage directory's name) and its one-step `sampling` settings, so that
    `python -m softdimo_jax.sample --mode student --generator ...` and
    `python -m softdimo_jax.evaluate --generator student --checkpoint ...` load and sample it
    as the stage did. Returns the path, or why nothing was written."""
    path = os.path.join(stage_dir, "student")
    if artifacts.is_remote(path) or jax.process_count() > 1:
        # save_converted writes a local folder from one process; on pods the orbax state in
        # <stage_dir>/checkpoints holds the same weights (ema_params).
        return f"(not exported: {path} is remote or the job is multi-process)"
    extra = {"stage": stage or os.path.basename(os.path.normpath(stage_dir))}
    if sampling:
        extra["sampling"] = dict(sampling)
    save_converted(path, family, model, params, source=f"{stage_dir} (EMA student)", overwrite=True, extra=extra)
    return path
