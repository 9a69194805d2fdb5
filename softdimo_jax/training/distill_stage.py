"""The distillation phase as a pipeline stage, and a stand-alone entry point for pods.

In the digits pipeline (`softdimo_jax.train`), after the teacher and the classifier:

    Stage("distill", distill_stage)          # fn(config, workdir, ctx) -> None

trains θ/ψ with `softdimo_jax.training.trainer.Trainer` (sharded init from the teacher,
donated jitted step, orbax checkpoints in <workdir>/distill/checkpoints, exact resume,
NaN guard, TensorBoard), then evaluates the one-step student (EMA weights) and adds the
rows `dimo@1` (hard tokens) and `dimo_soft@1` (expected bits into the decoder).

At scale (ImageNet MaskBit from converted checkpoints, TPU pods via launch/tpu_train.sh):

    python -m softdimo_jax.training.distill_stage \\
        --config=configs/maskbit_imagenet256_distill.py --workdir=gs://bucket/run \\
        --config.teacher_checkpoint=gs://bucket/ckpt/maskbit_generator_14bit

The same entry distills Di[M]O's MaskGIT teacher (configs/maskgit_imagenet256_distill.py,
taming VQGAN for the grid) and MaskGen from a prompt file (configs/maskgen_t2i_distill.py);
the teacher's family comes from its converted checkpoint (softdimo_jax.training.family_stages).

With SOFTDIMO_DISTRIBUTED=1 (set by the launch scripts) `jax.distributed.initialize()` runs
first; every process runs the same program (the method is data-free: each step draws its
own labels and tokens on device), and only process 0 writes logs, grids and metrics.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from softdimo_jax.training import distill


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when SOFTDIMO_DISTRIBUTED=1 (multi-host pods / GPU
    clusters); must run before anything touches the devices. On Cloud TPU the coordinator
    is discovered automatically; elsewhere set SOFTDIMO_COORDINATOR (host:port),
    SOFTDIMO_NUM_PROCESSES and SOFTDIMO_PROCESS_ID."""
    if os.environ.get("SOFTDIMO_DISTRIBUTED", "0") not in ("1", "true", "True"):
        return False
    kwargs = {}
    if os.environ.get("SOFTDIMO_COORDINATOR"):
        kwargs = dict(
            coordinator_address=os.environ["SOFTDIMO_COORDINATOR"],
            num_processes=int(os.environ["SOFTDIMO_NUM_PROCESSES"]),
            process_id=int(os.environ["SOFTDIMO_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
    return True


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _jsonable(c) -> Any:
    return json.loads(c.to_json()) if hasattr(c, "to_json") else c


def train_distill(dcfg, teacher_model, teacher_params, stage_dir: str | None, mesh, *,
                  fingerprint: Any = None, on_step_end=None, adapter=None, batch_fn=None):
    """Runs (or resumes, or restores when complete) the distillation phase.

    Returns (TrainResult, Distiller). The Trainer owns checkpoints and logging; the teacher
    travels as its `frozen` argument (sharded like params, never donated or checkpointed).
    `adapter`: a prebuilt adapter (default: distill.make_adapter). `batch_fn(step)`: this
    host's rows of the step's conditions batch for text-conditioned adapters (the prompt
    table's `PromptConditions.batch_fn`); None for class labels drawn in the step.
    """
    from softdimo_jax.training.trainer import Trainer

    adapter = adapter if adapter is not None else distill.make_adapter(teacher_model, dcfg)
    distiller = distill.Distiller(adapter, dcfg, mesh)

    class DistillTrainer(Trainer):
        def init_state(self):
            # θ, ψ, EMA copied from the (already placed) teacher, directly in their layout.
            init = jax.jit(distiller._init_fn, out_shardings=self.state_shardings)
            return init(self.frozen["teacher"])

    def step_fn(state, batch, rng, step, frozen):
        del step  # rng is already folded with the step by the Trainer
        # batch: None (data-free, class labels drawn in the step) or text conditions.
        return distiller._step_fn(state, frozen["teacher"], rng, batch)

    trainer = DistillTrainer(
        name="distill",
        stage_dir=stage_dir,
        init_fn=lambda rng: distiller._init_fn(teacher_params),  # shapes only (eval_shape)
        step_fn=step_fn,
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
    )
    return trainer.run(), distiller


def _class_ordered_labels(n: int, num_classes: int) -> np.ndarray:
    return (np.arange(n) % num_classes).astype(np.int32)


def sample_student_images(model, params, tokenizer, tok_params, dcfg, labels, mode: str, mesh,
                          batch_size: int, seed: int):
    """One-step student samples decoded to images (N, H, W, C) in [0, 1]."""
    from softdimo_jax.sampling.student import make_student_image_sampler

    sample = make_student_image_sampler(model, tokenizer, dcfg, mode, mesh)
    labels = np.asarray(labels, np.int32)
    out = []
    for i in range(0, len(labels), batch_size):
        lab = labels[i : i + batch_size]
        pad = -len(lab) % mesh.size
        padded = np.concatenate([lab, np.zeros(pad, np.int32)])
        imgs = sample(params, tok_params, jax.random.fold_in(jax.random.PRNGKey(seed), i), padded)
        out.append(np.asarray(imgs)[: len(lab)])
    return np.concatenate(out)


def export_student(stage_dir: str, model, params) -> str:
    """Writes the student's (EMA) weights as a converted checkpoint, `<stage_dir>/student`, that
    `python -m softdimo_jax.sample --mode student --generator ...` and `softdimo_jax.evaluate
    --generator student --checkpoint ...` load like any converted teacher."""
    from softdimo_jax.convert import save_converted

    path = os.path.join(stage_dir, "student")
    if "://" in path or jax.process_count() > 1:
        # save_converted writes a local folder from one process; on pods the orbax state in
        # <stage_dir>/checkpoints holds the same weights (ema_params).
        return f"(not exported: {path} is remote or the job is multi-process)"
    save_converted(path, "maskbit_generator", model, params, source=f"{stage_dir} (EMA student)",
                   overwrite=True)
    return path


def run_distill_stage(config, workdir: str, ctx: dict) -> dict:
    """Trains the student from ctx['teacher'] and returns the metric rows
    {'dimo@1': row, 'dimo_soft@1': row} (rows from ctx['evaluator'])."""
    from softdimo_jax.train import _save_grid, _sub, _writer  # the pipeline's helpers

    dcfg = config.distill
    stage_dir = os.path.join(workdir, "distill")
    teacher, tok = ctx["teacher"], ctx["tokenizer"]
    fingerprint = _sub(config, "data", "tokenizer", "teacher", "distill")
    t0 = time.time()
    result, distiller = train_distill(dcfg, teacher["model"], teacher["params"], stage_dir,
                                      ctx["mesh"], fingerprint=fingerprint)
    ctx["metrics"].setdefault("timings", {})["distill_train"] = round(time.time() - t0, 2)
    state = result.state
    params = state.ema_params if dcfg.sample.use_ema else state.gen_params
    ctx["student"] = dict(model=teacher["model"], params=params, state=state)
    _log(f"[distill] student weights -> {export_student(stage_dir, teacher['model'], params)}")

    ecfg = config.evaluation
    n = int(ecfg.num_samples)
    labels = _class_ordered_labels(n, int(teacher["model"].num_classes))
    rows = {}
    w = _writer(stage_dir)
    for name, mode in (("dimo@1", "hard"), ("dimo_soft@1", "soft")):
        t1 = time.time()
        images = sample_student_images(
            teacher["model"], params, tok["model"], tok["params"], dcfg, labels, mode,
            distiller.mesh, int(ecfg.batch_size), seed=int(config.seed) + 2000)
        rows[name] = ctx["evaluator"].evaluate(images, labels)
        ctx["metrics"]["timings"][name] = round(time.time() - t1, 2)
        _save_grid(stage_dir, name.replace("@", "_at"), images[: ecfg.grid_samples], w, int(dcfg.num_steps))
        w.write_scalars(int(dcfg.num_steps), {f"{name}/{m}": v for m, v in rows[name].items()})
        _log(f"[distill] {name}: " + ", ".join(f"{m} {v:.3f}" for m, v in rows[name].items()))
    w.close()
    return rows


def distill_stage(config, workdir: str, ctx: dict) -> None:
    """`Stage("distill", distill_stage)` for softdimo_jax.train.STAGES."""
    from softdimo_jax.train import add_rows

    add_rows(ctx, run_distill_stage(config, workdir, ctx))


# --------------------------------------------------------------------------- stand-alone entry
def _load_models(config):
    from softdimo_jax.convert import load_converted

    dcfg = config.distill
    overrides = dict(dtype=dcfg.compute_dtype, remat=bool(dcfg.remat))
    if not config.teacher_checkpoint:
        raise ValueError(
            "config.teacher_checkpoint is empty: convert the PyTorch generator first "
            "(python -m softdimo_jax.convert --model maskbit_generator --bits 14 SRC DST) and pass "
            "--config.teacher_checkpoint=DST"
        )
    model, params = load_converted(config.teacher_checkpoint, **overrides)
    tok = (None, None)
    if config.get("tokenizer_checkpoint"):
        tok = load_converted(config.tokenizer_checkpoint)
    return model, params, tok


def run_from_config(config, workdir: str) -> None:
    """Distills a converted teacher (config.teacher_checkpoint) and writes a sample grid of
    the one-step student (hard and soft) when a tokenizer checkpoint is given.

    The teacher's family comes from its checkpoint (checked against config.teacher_family
    when set): MaskBit and MaskGIT are class-conditional; MaskGen distills from
    config.prompt_file (softdimo_jax.training.family_stages)."""
    from softdimo_jax import parallel
    from softdimo_jax.sampling.grid import save_image_grid
    from softdimo_jax.training import family_stages

    dcfg = config.distill
    mesh = parallel.make_mesh(None if dcfg.num_devices in (-1, 0, None) else dcfg.num_devices, dcfg.fsdp)
    model, params, (tok_model, tok_params) = _load_models(config)
    family_stages.check_family(config, model)
    if not family_stages.is_lfq(model):
        family_stages.run_family(config, workdir, mesh, model, params, tok_model, tok_params,
                                 train_distill, _jsonable(config), _log)
        return
    stage_dir = os.path.join(workdir, "distill")
    result, distiller = train_distill(dcfg, model, params, stage_dir, mesh,
                                      fingerprint=_jsonable(config))
    if tok_model is None:
        _log("[distill] no tokenizer_checkpoint: skipping the sample grid")
        return
    gen = result.state.ema_params if dcfg.sample.use_ema else result.state.gen_params
    _log(f"[distill] student weights -> {export_student(stage_dir, model, gen)}")
    n = max(int(config.get("grid_samples", 16)), mesh.size)
    n -= n % mesh.size
    labels = np.asarray(config.get("grid_labels") or _class_ordered_labels(n, model.num_classes))[:n]
    for mode in ("hard", "soft"):
        images = sample_student_images(model, gen, tok_model, tok_params, dcfg, labels, mode,
                                       distiller.mesh, len(labels), seed=int(dcfg.seed) + 2000)
        if jax.process_index() == 0 and not workdir.startswith("gs://"):
            save_image_grid(images, os.path.join(stage_dir, f"student_{mode}.png"))
        elif jax.process_index() == 0:
            import tensorflow as tf  # gs:// paths go through tf.io.gfile
            import io
            from PIL import Image
            from softdimo_jax.sampling.grid import make_image_grid

            buf = io.BytesIO()
            Image.fromarray(make_image_grid(images)).save(buf, format="PNG")
            with tf.io.gfile.GFile(os.path.join(stage_dir, f"student_{mode}.png"), "wb") as f:
                f.write(buf.getvalue())


def run_entry(run_fn, config_help: str, workdir_help: str) -> None:
    """absl entry shared by the stand-alone phases: --config (locked ml_collections file) and
    --workdir, distributed init on pods, then `run_fn(config, workdir)`."""
    from absl import app, flags
    from ml_collections import config_flags

    cfg_flag = config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    wd_flag = flags.DEFINE_string("workdir", None, workdir_help)

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        if cfg_flag.value is None or not wd_flag.value:
            raise app.UsageError("--config and --workdir are required")
        from absl import logging

        logging.set_verbosity(logging.WARNING)
        run_fn(cfg_flag.value, wd_flag.value)

    maybe_initialize_distributed()
    app.run(_main)


def main() -> None:
    run_entry(run_from_config, "distillation config file",
              "checkpoints, TensorBoard and grids (local or gs://)")


if __name__ == "__main__":
    main()
