"""The digits pipeline as an ordered list of cached stages: `train_and_evaluate(config, workdir)`.

    tokenizer -> teacher -> classifier -> evaluate_teacher   (later issues insert more)

A stage is `Stage(name, fn)` with `fn(config, workdir, ctx) -> None`; it reads what earlier
stages left in the context `ctx` (a dict) and adds its own entries. Each stage works in
`<workdir>/<name>/`: training stages keep orbax checkpoints there (a finished checkpoint
means the stage is restored, not retrained), evaluation stages cache their rows in
`rows.json`. Every stage writes a sample grid PNG and TensorBoard summaries there.

Context keys set here (later stages may rely on them):
  config, workdir, mesh,
  data:       {"train": (images, labels), "test": (images, labels)}  numpy, NHWC [0, 1]
  tokenizer:  {"model": ConvVQModel, "params", "grid": tokens per side, "train_tokens" (N, L)}
  teacher:    {"model": LFQBert, "params" (EMA if enabled), "state"}
  evaluator:  DigitsEvaluator (classifier + test-split statistics)
  metrics:    {"floor": {...}, "rows": {name: row}, ...} — mirrored to <workdir>/metrics.json
  decode:     fn(sub_tokens (B, L, S)) -> images, the tokenizer decode of teacher tokens

To add a stage (e.g. distillation after the teacher), add `Stage("distill", fn)` to
`STAGES` at its place; evaluation rows go through `add_rows(ctx, {...})`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from softdimo_jax import parallel
from softdimo_jax.data import digits
from softdimo_jax.evaluation.digits_classifier import train_classifier
from softdimo_jax.evaluation.digits_metrics import DigitsEvaluator, format_table
from softdimo_jax.models import lfq
from softdimo_jax.sampling.grid import make_image_grid, save_image_grid
from softdimo_jax.training import checkpointing, refine_stages, teacher_train, tokenizer_train
from softdimo_jax.training.trainer import format_seconds


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[Any, str, dict], None]


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _sub(config, *keys) -> dict:
    """JSON of config sub-trees: the fingerprint stored with a stage's checkpoints."""
    return {k: checkpointing.to_jsonable(config[k]) for k in keys}


def _writer(stage_dir: str):
    from clu import metric_writers

    return metric_writers.create_default_writer(
        os.path.join(stage_dir, "tb"), just_logging=jax.process_index() != 0
    )


def _save_grid(stage_dir: str, name: str, images, writer=None, step: int = 0, nrow: int = 10) -> None:
    """PNG grid in the stage dir and, with a writer, the same grid as a TensorBoard image."""
    if jax.process_index() != 0:
        return
    save_image_grid(images, os.path.join(stage_dir, f"{name}.png"), nrow=nrow)
    if writer is not None:
        grid = make_image_grid(images, nrow=nrow).astype(np.float32) / 255.0
        writer.write_images(step, {name: grid[None]})


def _class_ordered_labels(n: int, num_classes: int = digits.NUM_CLASSES) -> np.ndarray:
    return (np.arange(n) % num_classes).astype(np.int32)


# --------------------------------------------------------------------------- metrics.json
def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, "metrics.json")


def write_metrics(ctx: dict) -> None:
    if jax.process_index() != 0:
        return
    path = metrics_path(ctx["workdir"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ctx["metrics"], f, indent=2, sort_keys=False)
    os.replace(tmp, path)  # atomic: readers never see half a file


def add_rows(ctx: dict, rows: dict[str, dict]) -> None:
    """Adds metric rows ({name: {fd_digits, accuracy, precision, recall, ...}}) and saves."""
    ctx["metrics"]["rows"].update(rows)
    write_metrics(ctx)


# --------------------------------------------------------------------------- stages
def tokenizer_stage(config, workdir: str, ctx: dict) -> None:
    stage_dir = os.path.join(workdir, "tokenizer")
    train_x, train_y = ctx["data"]["train"]
    test_x, _ = ctx["data"]["test"]
    tcfg = config.tokenizer.train
    batch_fn = digits.make_batch_fn(train_x, train_y, tcfg.batch_size, config.seed + 1)
    model, params, result = tokenizer_train.train_tokenizer(
        config.tokenizer.model, tcfg, batch_fn, train_x.shape[1:], stage_dir, mesh=ctx["mesh"],
        seed=config.seed, keep=config.checkpoint.keep, config_json=_sub(config, "data", "tokenizer"),
    )
    grid = train_x.shape[1] // model.downsample_factor
    train_tokens = tokenizer_train.encode_dataset(model, params, train_x)
    test_tokens = tokenizer_train.encode_dataset(model, params, test_x)
    test_recon = tokenizer_train.decode_tokens(model, params, test_tokens, grid)
    mse = float(np.mean((test_recon - test_x) ** 2))
    used = len(np.unique(train_tokens))
    ctx["tokenizer"] = dict(model=model, params=params, grid=grid, train_tokens=train_tokens,
                            test_recon=test_recon)
    ctx["decode"] = lambda sub: tokenizer_train.decode_tokens(
        model, params, np.asarray(lfq.merge_splits(sub, model.num_bits, config.teacher.model.splits)), grid
    )
    ctx["metrics"]["tokenizer"] = {"test_recon_mse": mse, "codes_used": used,
                                   "tokens_per_image": grid * grid}
    write_metrics(ctx)
    n = min(50, len(test_x))
    pairs = np.stack([test_x[:n], test_recon[:n]], 1).reshape(2 * n, *test_x.shape[1:])
    w = _writer(stage_dir)
    w.write_scalars(tcfg.num_steps, {"test_recon_mse": mse, "codes_used": used})
    _save_grid(stage_dir, "reconstructions", pairs, w, tcfg.num_steps, nrow=20)
    w.close()
    _log(f"[tokenizer] {grid}x{grid} tokens, test recon MSE {mse:.4f}, {used} codes used")


def teacher_stage(config, workdir: str, ctx: dict) -> None:
    stage_dir = os.path.join(workdir, "teacher")
    tok = ctx["tokenizer"]
    _, train_y = ctx["data"]["train"]
    model = teacher_train.teacher_from_config(config.teacher.model, tok["grid"] ** 2,
                                              tok["model"].num_bits)
    tcfg = config.teacher.train
    tokens = tok["train_tokens"]
    local = digits.process_slice(tcfg.batch_size)

    def batch_fn(step):
        idx = digits.batch_indices(len(tokens), tcfg.batch_size, step, config.seed + 2)[local]
        return {"tokens": tokens[idx], "label": train_y[idx]}

    state, _ = teacher_train.train_teacher(
        model, tcfg, batch_fn, stage_dir, mesh=ctx["mesh"], fsdp=config.mesh.fsdp > 1,
        seed=config.seed, keep=config.checkpoint.keep,
        config_json=_sub(config, "data", "tokenizer", "teacher"),
    )
    params = state["ema"] if (config.sampler.use_ema and "ema" in state) else state["params"]
    ctx["teacher"] = dict(model=model, params=params, state=state)
    steps = max(config.evaluation.teacher_steps)
    images = sample_teacher(config, ctx, config.evaluation.grid_samples, steps, seed=config.seed + 99)
    w = _writer(stage_dir)
    _save_grid(stage_dir, f"samples_{steps}steps", images, w, tcfg.num_steps)
    w.close()


def sample_teacher(config, ctx: dict, num: int, num_steps: int, seed: int, batch_size=None):
    """`num` class-ordered teacher samples (labels i % 10) decoded to images."""
    from softdimo_jax.sampling.maskbit_sampler import make_maskbit_teacher_sampler

    teacher = ctx["teacher"]
    key = ("sampler", num_steps)
    if key not in teacher:
        teacher[key] = make_maskbit_teacher_sampler(
            teacher["model"], num_steps=int(num_steps),
            **{k: v for k, v in config.sampler.items() if k != "use_ema"},
        )
    sampler = teacher[key]
    batch_size = int(batch_size or config.evaluation.batch_size)
    out = []
    for i in range(0, num, batch_size):
        # Always a full batch (one compiled shape); the labels continue the class cycle.
        lab = _class_ordered_labels(i + batch_size)[i:]
        sub = sampler(teacher["params"], jax.random.fold_in(jax.random.PRNGKey(seed), i), lab)
        out.append(ctx["decode"](np.asarray(sub)[: num - i]))
    return np.concatenate(out)


def classifier_stage(config, workdir: str, ctx: dict) -> None:
    stage_dir = os.path.join(workdir, "classifier")
    train_x, train_y = ctx["data"]["train"]
    test_x, test_y = ctx["data"]["test"]
    model, params, _ = train_classifier(
        config.classifier, train_x, train_y, stage_dir, mesh=ctx["mesh"], seed=config.seed,
        config_json=_sub(config, "data", "classifier"),
    )
    ev = DigitsEvaluator(model, params, test_x, test_y, train_images=train_x,
                         pr_k=config.evaluation.pr_k, batch_size=config.evaluation.batch_size)
    ctx["evaluator"] = ev
    floor = ev.floor()
    ctx["metrics"]["floor"] = floor
    ctx["metrics"]["classifier"] = {"test_accuracy": ev.test_accuracy}
    if "tokenizer" in ctx:  # how far the tokenizer alone is from the data (a bound for generators)
        ctx["metrics"]["tokenizer"]["test_recon"] = ev.evaluate(ctx["tokenizer"]["test_recon"], test_y)
    write_metrics(ctx)
    w = _writer(stage_dir)
    _save_grid(stage_dir, "test_images", test_x[:100], w)
    w.write_scalars(0, {"test_accuracy": ev.test_accuracy, "floor_fd_digits": floor["fd_digits"]})
    w.close()
    _log(f"[classifier] test accuracy {ev.test_accuracy:.4f}; floor FD(train, test) "
         f"{floor['fd_digits']:.3f}")


def evaluate_teacher_stage(config, workdir: str, ctx: dict) -> None:
    stage_dir = os.path.join(workdir, "evaluate_teacher")
    os.makedirs(stage_dir, exist_ok=True)
    cache = os.path.join(stage_dir, "rows.json")
    fingerprint = _sub(config, "seed", "data", "tokenizer", "teacher", "sampler", "classifier", "evaluation")
    if os.path.exists(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("config") == fingerprint:
            _log(f"[evaluate_teacher] cached rows in {cache}")
            add_rows(ctx, cached["rows"])
            return
    ecfg = config.evaluation
    rows = {}
    w = _writer(stage_dir)
    for k in ecfg.teacher_steps:
        t0 = time.time()
        images = sample_teacher(config, ctx, ecfg.num_samples, k, seed=config.seed + 1000 + k)
        row = ctx["evaluator"].evaluate(images, _class_ordered_labels(ecfg.num_samples))
        rows[f"teacher@{k}"] = row
        ctx["metrics"]["timings"][f"teacher@{k}"] = round(time.time() - t0, 2)
        _save_grid(stage_dir, f"teacher@{k}", images[: ecfg.grid_samples], w, int(k))
        w.write_scalars(int(k), {f"teacher/{m}": v for m, v in row.items()})
        _log(f"[evaluate_teacher] {k} steps: " + ", ".join(f"{m} {v:.3f}" for m, v in row.items()))
    w.close()
    if jax.process_index() == 0:
        with open(cache + ".tmp", "w") as f:
            json.dump({"config": fingerprint, "rows": rows}, f, indent=2)
        os.replace(cache + ".tmp", cache)
    add_rows(ctx, rows)


def _distill_stage(config, workdir: str, ctx: dict) -> None:
    # Imported lazily: the distillation phase pulls in optax/orbax set-up of its own.
    from softdimo_jax.training.distill_stage import distill_stage

    distill_stage(config, workdir, ctx)


STAGES: list[Stage] = [
    Stage("tokenizer", tokenizer_stage),
    Stage("teacher", teacher_stage),
    Stage("classifier", classifier_stage),
    Stage("evaluate_teacher", evaluate_teacher_stage),
    Stage("distill", _distill_stage),
    # Post-distillation refinement through soft embeddings (SPEC §1.3-1.5).
    Stage("softdimo_gan", refine_stages.softdimo_gan_stage),
    Stage("gumbel_gan", refine_stages.gumbel_gan_stage),
    Stage("reward", refine_stages.reward_stage),
    Stage("tteo", refine_stages.tteo_stage),  # rows tteo_k2@1, tteo_k4@1
]


# --------------------------------------------------------------------------- driver
def _check_config(config) -> None:
    if config.data.name != "digits":
        raise ValueError(
            f"the pipeline runs on the embedded digits set; data.name={config.data.name!r} is not "
            "supported here (ImageNet training uses softdimo_jax.data.tfds_images directly)"
        )
    if config.classifier.image_size != config.data.image_size:
        raise ValueError("classifier.image_size must equal data.image_size")


def make_context(config, workdir: str) -> dict:
    mesh = parallel.make_mesh(config.mesh.num_devices or None, fsdp=config.mesh.fsdp)
    size, ch = config.data.image_size, config.data.channels
    return {
        "config": config,
        "workdir": workdir,
        "mesh": mesh,
        "data": {s: digits.load_digits_split(s, size, ch) for s in ("train", "test")},
        "metrics": {"floor": {}, "rows": {}, "timings": {}},
    }


def train_and_evaluate(config, workdir: str, stages: list[Stage] | None = None) -> dict:
    """Runs every stage in order (cached ones are restored) and returns the metrics dict
    ({"floor": {...}, "rows": {...}, ...}, also in <workdir>/metrics.json)."""
    _check_config(config)
    os.makedirs(workdir, exist_ok=True)
    ctx = make_context(config, workdir)
    t_all = time.time()
    for stage in stages or STAGES:
        t0 = time.time()
        _log(f"=== stage {stage.name} ===")
        stage.fn(config, workdir, ctx)
        ctx["metrics"]["timings"][stage.name] = round(time.time() - t0, 2)
        _log(f"=== stage {stage.name} done in {format_seconds(time.time() - t0)} ===")
    ctx["metrics"]["timings"]["total"] = round(time.time() - t_all, 2)
    write_metrics(ctx)
    table = format_table(ctx["metrics"]["floor"], ctx["metrics"]["rows"])
    if jax.process_index() == 0:
        print(table, flush=True)
        print(f"total {format_seconds(time.time() - t_all)}; metrics in {metrics_path(workdir)}", flush=True)
    return ctx["metrics"]
