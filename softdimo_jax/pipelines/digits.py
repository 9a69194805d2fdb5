"""The embedded default: every stage of Soft-Di[M]O on scikit-learn's digits, in order.

    tokenizer -> teacher -> classifier -> evaluate_teacher -> distill
              -> softdimo_gan -> gumbel_gan -> reward -> tteo        (digits_refine.py)

Each stage works in `<workdir>/<name>/`: training stages keep orbax checkpoints there (a
finished checkpoint means the stage is restored, not retrained), evaluation stages cache
their rows in `rows.json` next to the fingerprint of the configs they depend on. Every
stage writes a sample grid PNG and TensorBoard summaries there; rows go to
`<workdir>/metrics.json` as they are made; at the end the report (summary.png,
fd_vs_steps.png, results.md: pipelines/report.py). `train_and_evaluate(config, workdir)` is
the pipeline `digits` of `python -m softdimo_jax.main`.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from softdimo_jax.core import objectives
from softdimo_jax.core.dimo import generator_params
from softdimo_jax.data import digits
from softdimo_jax.evaluation.digits_classifier import train_classifier
from softdimo_jax.evaluation.digits_metrics import DigitsEvaluator, format_table
from softdimo_jax.sampling.maskbit_sampler import make_maskbit_teacher_sampler
from softdimo_jax.pipelines import digits_refine, phases, report
from softdimo_jax.pipelines.context import (GeneratorRun, RunContext, SeedOffsets, Stage, TeacherRun,
                                            TokenizerRun)
from softdimo_jax.runtime import artifacts
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.artifacts import log
from softdimo_jax.runtime.checkpointing import StaleStageError
from softdimo_jax.runtime.trainer import format_seconds
from softdimo_jax.sampling import codec
from softdimo_jax.sampling.batching import class_ordered_labels, padded_label_batches
from softdimo_jax.sampling.student import sample_student_images


def tokenizer_stage(ctx: RunContext) -> None:
    config, stage_dir = ctx.config, ctx.stage_dir("tokenizer")
    train_x, train_y = ctx.data["train"]
    test_x, _ = ctx.data["test"]
    tcfg = config.tokenizer.train
    batch_fn = digits.make_batch_fn(train_x, train_y, tcfg.batch_size, config.seed + SeedOffsets.TOKENIZER_BATCHES)
    model, params, _ = phases.train_tokenizer(
        config.tokenizer.model, tcfg, batch_fn, train_x.shape[1:], stage_dir, mesh=ctx.mesh,
        seed=config.seed, keep=config.checkpoint.keep, config_json=ctx.identity("tokenizer", "data", "tokenizer"),
    )
    grid = train_x.shape[1] // model.downsample_factor
    train_tokens = codec.encode_dataset(model, params, train_x)
    test_tokens = codec.encode_dataset(model, params, test_x)
    test_recon = codec.decode_tokens(model, params, test_tokens, grid)
    mse = float(np.mean((test_recon - test_x) ** 2))
    used = len(np.unique(train_tokens))
    ctx.tokenizer = TokenizerRun(model=model, params=params, grid=grid, splits=int(config.teacher.model.splits),
                                 train_tokens=train_tokens, test_recon=test_recon)
    ctx.metrics["tokenizer"] = {"test_recon_mse": mse, "codes_used": used, "tokens_per_image": grid * grid}
    ctx.write_metrics()
    n = min(50, len(test_x))
    pairs = np.stack([test_x[:n], test_recon[:n]], 1).reshape(2 * n, *test_x.shape[1:])
    w = artifacts.writer(stage_dir)
    w.write_scalars(tcfg.num_steps, {"test_recon_mse": mse, "codes_used": used})
    artifacts.save_grid(stage_dir, "reconstructions", pairs, w, tcfg.num_steps, nrow=20)
    w.close()
    log(f"[tokenizer] {grid}x{grid} tokens, test recon MSE {mse:.4f}, {used} codes used")


def teacher_stage(ctx: RunContext) -> None:
    config, stage_dir = ctx.config, ctx.stage_dir("teacher")
    tok = ctx.tokenizer
    _, train_y = ctx.data["train"]
    model = objectives.teacher_from_config(config.teacher.model, tok.grid**2, tok.model.num_bits)
    tcfg = config.teacher.train
    tokens = tok.train_tokens
    local = digits.process_slice(tcfg.batch_size)

    def batch_fn(step):
        idx = digits.batch_indices(len(tokens), tcfg.batch_size, step,
                                   config.seed + SeedOffsets.TEACHER_BATCHES)[local]
        return {"tokens": tokens[idx], "label": train_y[idx]}

    state, _ = phases.train_teacher(
        model, tcfg, batch_fn, stage_dir, mesh=ctx.mesh, fsdp=config.mesh.fsdp > 1,
        seed=config.seed, keep=config.checkpoint.keep,
        config_json=ctx.identity("teacher", "data", "teacher", upstream=("tokenizer",)),
    )
    params = state["ema"] if (config.sampler.use_ema and "ema" in state) else state["params"]
    ctx.teacher = TeacherRun(model=model, params=params, state=state)
    steps = max(config.evaluation.teacher_steps)
    images = sample_teacher(ctx, config.evaluation.grid_samples, steps, seed=config.seed + SeedOffsets.TEACHER_GRID)
    w = artifacts.writer(stage_dir)
    artifacts.save_grid(stage_dir, f"samples_{steps}steps", images, w, tcfg.num_steps)
    w.close()


def sample_teacher(ctx: RunContext, num: int, num_steps: int, seed: int, batch_size=None) -> np.ndarray:
    """`num` class-ordered teacher samples (labels i % classes) decoded to images; every
    batch is full (one compiled shape) and its labels continue the class cycle."""
    config, teacher = ctx.config, ctx.teacher
    if num_steps not in teacher.samplers:
        teacher.samplers[num_steps] = make_maskbit_teacher_sampler(
            teacher.model, num_steps=int(num_steps),
            **{k: v for k, v in config.sampler.items() if k != "use_ema"},
        )
    sampler = teacher.samplers[num_steps]
    batch_size = int(batch_size or config.evaluation.batch_size)
    labels = class_ordered_labels(-(-num // batch_size) * batch_size, digits.NUM_CLASSES)
    out = []
    for i, lab, _ in padded_label_batches(labels, batch_size, 1):
        sub = sampler(teacher.params, jax.random.fold_in(jax.random.PRNGKey(seed), i), lab)
        out.append(ctx.tokenizer.decode_subtokens(np.asarray(sub)[: num - i]))
    return np.concatenate(out)


def classifier_stage(ctx: RunContext) -> None:
    config, stage_dir = ctx.config, ctx.stage_dir("classifier")
    train_x, train_y = ctx.data["train"]
    test_x, test_y = ctx.data["test"]
    model, params, _ = train_classifier(
        config.classifier, train_x, train_y, stage_dir, mesh=ctx.mesh, seed=config.seed,
        config_json=ctx.identity("classifier", "data", "classifier"),
    )
    ev = DigitsEvaluator(model, params, test_x, test_y, train_images=train_x,
                         pr_k=config.evaluation.pr_k, batch_size=config.evaluation.batch_size)
    ctx.evaluator = ev
    floor = ev.floor()
    ctx.metrics["floor"] = floor
    ctx.metrics["classifier"] = {"test_accuracy": ev.test_accuracy}
    if ctx.tokenizer is not None:  # how far the tokenizer alone is from the data (a bound for generators)
        ctx.metrics["tokenizer"]["test_recon"] = ev.evaluate(ctx.tokenizer.test_recon, test_y)
    ctx.write_metrics()
    w = artifacts.writer(stage_dir)
    artifacts.save_grid(stage_dir, "test_images", test_x[:100], w)
    w.write_scalars(0, {"test_accuracy": ev.test_accuracy, "floor_fd_digits": floor["fd_digits"]})
    w.close()
    log(f"[classifier] test accuracy {ev.test_accuracy:.4f}; floor FD(train, test) {floor['fd_digits']:.3f}")


def evaluate_teacher_stage(ctx: RunContext) -> None:
    config, stage_dir = ctx.config, ctx.stage_dir("evaluate_teacher")
    fp = ctx.identity("evaluate_teacher", "sampler", "evaluation", upstream=("teacher", "classifier"))
    rows = artifacts.load_rows(stage_dir, fp)
    if rows is not None:
        log(f"[evaluate_teacher] cached rows in {artifacts.rows_path(stage_dir)}")
        ctx.add_rows(rows)
        return
    ecfg = config.evaluation
    rows = {}
    w = artifacts.writer(stage_dir)
    for k in ecfg.teacher_steps:
        t0 = time.time()
        images = sample_teacher(ctx, ecfg.num_samples, k, seed=config.seed + SeedOffsets.TEACHER_ROWS + k)
        row = ctx.evaluator.evaluate(images, class_ordered_labels(ecfg.num_samples, digits.NUM_CLASSES))
        rows[f"teacher@{k}"] = row
        ctx.record_time(f"teacher@{k}", time.time() - t0)
        artifacts.save_grid(stage_dir, f"teacher@{k}", images[: ecfg.grid_samples], w, int(k))
        w.write_scalars(int(k), {f"teacher/{m}": v for m, v in row.items()})
        log(f"[evaluate_teacher] {k} steps: " + ", ".join(f"{m} {v:.3f}" for m, v in row.items()))
    w.close()
    artifacts.save_rows(stage_dir, fp, rows)
    ctx.add_rows(rows)


def distill_stage(ctx: RunContext) -> None:
    """Di[M]O from the teacher (core/dimo.py through phases.train_distill), then the
    one-step student (EMA weights) evaluated as `dimo@1` (hard tokens) and `dimo_soft@1`
    (expected bits into the decoder); the student is exported to <workdir>/distill/student."""
    config, stage_dir = ctx.config, ctx.stage_dir("distill")
    dcfg, teacher, tok = config.distill, ctx.teacher, ctx.tokenizer
    t0 = time.time()
    result, distiller = phases.train_distill(dcfg, teacher.model, teacher.params, stage_dir, ctx.mesh,
                                             fingerprint=ctx.identity("distill", "distill", upstream=("teacher",)))
    ctx.record_time("distill_train", time.time() - t0)
    params = generator_params(result.state, dcfg.sample.use_ema)
    ctx.generators["distill"] = GeneratorRun(state=result.state, params=params)
    log(f"[distill] student weights -> {phases.export_student(stage_dir, 'maskbit_generator', teacher.model, params)}")

    ecfg = config.evaluation
    labels = class_ordered_labels(int(ecfg.num_samples), int(teacher.model.num_classes))
    rows = {}
    w = artifacts.writer(stage_dir)
    for name, mode in (("dimo@1", "hard"), ("dimo_soft@1", "soft")):
        t1 = time.time()
        images = sample_student_images(teacher.model, params, tok.model, tok.params, dcfg, labels, mode,
                                       distiller.mesh, int(ecfg.batch_size),
                                       seed=int(config.seed) + SeedOffsets.STUDENT_ROWS)
        rows[name] = ctx.evaluator.evaluate(images, labels)
        ctx.record_time(name, time.time() - t1)
        artifacts.save_grid(stage_dir, name.replace("@", "_at"), images[: ecfg.grid_samples], w, int(dcfg.num_steps))
        w.write_scalars(int(dcfg.num_steps), {f"{name}/{m}": v for m, v in rows[name].items()})
        log(f"[distill] {name}: " + ", ".join(f"{m} {v:.3f}" for m, v in rows[name].items()))
    w.close()
    ctx.add_rows(rows)


STAGES: list[Stage] = [
    Stage("tokenizer", tokenizer_stage),
    Stage("teacher", teacher_stage),
    Stage("classifier", classifier_stage),
    Stage("evaluate_teacher", evaluate_teacher_stage),
    Stage("distill", distill_stage),
    # Post-distillation refinement through soft embeddings (SPEC §1.3-1.5).
    Stage("softdimo_gan", digits_refine.softdimo_gan_stage),
    Stage("gumbel_gan", digits_refine.gumbel_gan_stage),
    Stage("reward", digits_refine.reward_stage),
    Stage("tteo", digits_refine.tteo_stage),  # rows tteo_k2@1, tteo_k4@1
]


def check_config(config) -> None:
    if config.data.name != "digits":
        raise ValueError(
            f"the digits pipeline runs on the embedded digits set; data.name={config.data.name!r} is "
            "not supported here (ImageNet runs use the teacher / distill / gan pipelines)"
        )
    if config.classifier.image_size != config.data.image_size:
        raise ValueError("classifier.image_size must equal data.image_size")


def make_context(config, workdir: str) -> RunContext:
    mesh = meshlib.make_mesh(config.mesh.num_devices or None, fsdp=config.mesh.fsdp)
    size, ch = config.data.image_size, config.data.channels
    data = {s: digits.load_digits_split(s, size, ch) for s in ("train", "test")}
    return RunContext(config=config, workdir=workdir, mesh=mesh, data=data)


def train_and_evaluate(config, workdir: str, stages: list[Stage] | None = None) -> dict:
    """Runs every stage in order (cached ones are restored) and returns the metrics dict
    ({"floor": {...}, "rows": {...}, ...}, also in <workdir>/metrics.json)."""
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    ctx = make_context(config, workdir)
    t_all = time.time()
    stages = stages or STAGES
    for i, stage in enumerate(stages):
        t0 = time.time()
        log(f"=== stage {stage.name} ===")
        try:
            stage.fn(ctx)
        except StaleStageError as e:
            later = [ctx.stage_dir(s.name) for s in stages[i:] if os.path.isdir(ctx.stage_dir(s.name))]
            raise StaleStageError(f"{e} (stage directories from here on: {' '.join(later)})") from e
        ctx.record_time(stage.name, time.time() - t0)
        log(f"=== stage {stage.name} done in {format_seconds(time.time() - t0)} ===")
    ctx.record_time("total", time.time() - t_all)
    ctx.write_metrics()
    table = format_table(ctx.metrics["floor"], ctx.metrics["rows"])
    written = report.write_report(workdir) if not artifacts.is_remote(workdir) else []
    if jax.process_index() == 0:
        print(table, flush=True)
        print(f"total {format_seconds(time.time() - t_all)}; metrics in {ctx.metrics_path}", flush=True)
        if written:
            print("report: " + ", ".join(written), flush=True)
    return ctx.metrics
