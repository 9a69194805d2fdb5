"""The refinement stages of the digits pipeline (SPEC §1.3–1.5), after `distill`:

    softdimo_gan  Soft-Di[M]O + GAN from the distilled student        -> row softdimo_gan@1
    gumbel_gan    the same with Gumbel-softmax straight-through (ablation) -> gumbel_gan@1
    reward        reward fine-tuning from the softdimo_gan generator  -> reward@1
    tteo          TTEO sampling of the reward generator, K = 2 and 4  -> tteo_k2@1, tteo_k4@1

Each training stage is a Trainer run with checkpoints in <workdir>/<stage>/ (a finished
run is restored, not retrained); every stage caches its evaluation rows in rows.json next
to a fingerprint of the configs it depends on. Every row carries `reward` (the mean of the
configured reward set on the evaluated images: the digits classifier's log p(c | x)).
Rows are sampled exactly like `dimo@1` (hard tokens, same seed, EMA weights), so row
differences are paired.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.core import reward as rewards
from softdimo_jax.core.adapters import make_adapter
from softdimo_jax.core.dimo import generator_params
from softdimo_jax.core.gan import GanRefiner
from softdimo_jax.data import digits
from softdimo_jax.pipelines import phases
from softdimo_jax.pipelines.context import GeneratorRun, RunContext, SeedOffsets
from softdimo_jax.runtime import artifacts
from softdimo_jax.runtime.artifacts import log
from softdimo_jax.sampling.batching import class_ordered_labels, padded_label_batches
from softdimo_jax.sampling.student import decode_images, sample_student_images
from softdimo_jax.sampling.tteo import tteo_sampler_from_config

# The generator each stage starts from, in order of preference.
REWARD_SOURCES = ("softdimo_gan", "distill")
TTEO_SOURCES = ("reward", "softdimo_gan", "distill")

# --------------------------------------------------------------------------- rewards & rows


def reward_set_from(spec, ctx: RunContext) -> rewards.RewardSet:
    """The reward set `spec` with the resources the built-in rewards need: the digits
    evaluation classifier."""
    ev = ctx.evaluator
    return rewards.build_reward_set(spec, classifier_apply=lambda p, x: ev.model.apply({"params": p}, x),
                                    classifier_params=ev.params)


def mean_reward(rset: rewards.RewardSet, images, labels, batch_size: int = 500) -> float:
    fn = jax.jit(lambda p, x, y: rset.total(p, x, y)[0])
    vals = [np.asarray(fn(rset.params, jnp.asarray(images[i : i + batch_size]),
                          jnp.asarray(labels[i : i + batch_size])))
            for i in range(0, len(images), batch_size)]
    return float(np.mean(np.concatenate(vals)))


def evaluate_row(ctx: RunContext, rset, images, labels) -> dict:
    row = dict(ctx.evaluator.evaluate(images, labels))
    row["reward"] = mean_reward(rset, images, labels)
    return row


def eval_labels(ctx: RunContext) -> np.ndarray:
    return class_ordered_labels(int(ctx.config.evaluation.num_samples), int(ctx.teacher.model.num_classes))


def student_images(ctx: RunContext, params, mesh) -> np.ndarray:
    """Hard-token one-step samples of the evaluation labels (the dimo@1 stream)."""
    tok = ctx.tokenizer
    return sample_student_images(
        ctx.teacher.model, params, tok.model, tok.params, ctx.config.distill, eval_labels(ctx), "hard", mesh,
        int(ctx.config.evaluation.batch_size), seed=int(ctx.config.seed) + SeedOffsets.STUDENT_ROWS)


def write_row(ctx: RunContext, stage_dir: str, name: str, images, row: dict) -> None:
    artifacts.save_grid(stage_dir, name.replace("@", "_at"), images[: ctx.config.evaluation.grid_samples])
    log(f"[{name}] " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))


def refined_row(ctx: RunContext, stage_dir: str, name: str, fp: dict, params, mesh) -> None:
    """The row `name` of a refined generator, from the cache when its fingerprint matches."""
    rows = artifacts.load_rows(stage_dir, fp)
    if rows is None:
        images = student_images(ctx, params, mesh)
        row = evaluate_row(ctx, reward_set_from(ctx.config.reward.eval_rewards, ctx), images, eval_labels(ctx))
        write_row(ctx, stage_dir, name, images, row)
        rows = {name: row}
        artifacts.save_rows(stage_dir, fp, rows)
    ctx.add_rows(rows)


# --------------------------------------------------------------------------- GAN


def train_gan(ctx: RunContext, stage_dir: str, gcfg, start_state, name: str):
    """Runs (or restores) a GAN phase from `start_state` (a DistillState)."""
    config = ctx.config
    refiner = GanRefiner(make_adapter(ctx.teacher.model, config.distill), config.distill, gcfg, ctx.mesh)
    tokens = np.asarray(ctx.tokenizer.train_tokens, np.int32)
    labels = np.asarray(ctx.data["train"][1], np.int32)
    bs = int(gcfg.batch_size)
    local = digits.process_slice(bs)

    def batch_fn(step):
        idx = digits.batch_indices(len(tokens), bs, step, int(gcfg.seed) + SeedOffsets.GAN_REAL_BATCHES)[local]
        return {"indices": tokens[idx], "labels": labels[idx]}

    teacher_params = ctx.teacher.params
    init = lambda s, tp: refiner.init_state(jax.random.PRNGKey(int(gcfg.seed)), s, tp)
    result = phases.train_refinement(
        name, refiner, init, (start_state, teacher_params), gcfg, stage_dir, batch_fn=batch_fn,
        frozen={"teacher": teacher_params}, keep=config.checkpoint.keep,
        fingerprint=ctx.identity(name, "data", "gan", upstream=("distill",), soft_mode=str(gcfg.soft_mode)))
    return result.state, refiner


def gan_stage(ctx: RunContext, name: str, soft_mode: str) -> None:
    config, stage_dir = ctx.config, ctx.stage_dir(name)
    gcfg = config.gan.copy_and_resolve_references()
    gcfg.soft_mode = soft_mode
    t0 = time.time()
    state, refiner = train_gan(ctx, stage_dir, gcfg, ctx.generators["distill"].state, name)
    ctx.record_time(f"{name}_train", time.time() - t0)
    params = generator_params(state.dimo, config.distill.sample.use_ema)
    ctx.generators[name] = GeneratorRun(state=state.dimo, params=params)
    fp = ctx.identity(f"{name}@1", "reward", "evaluation", upstream=(name, "classifier"))
    refined_row(ctx, stage_dir, f"{name}@1", fp, params, refiner.mesh)


def softdimo_gan_stage(ctx: RunContext) -> None:
    """Soft-Di[M]O + GAN (soft embeddings into the frozen teacher) -> softdimo_gan@1."""
    gan_stage(ctx, "softdimo_gan", str(ctx.config.gan.soft_mode))


def gumbel_gan_stage(ctx: RunContext) -> None:
    """Ablation: Gumbel-softmax straight-through instead of soft embeddings -> gumbel_gan@1."""
    gan_stage(ctx, "gumbel_gan", str(ctx.config.gan.get("ablation_soft_mode", "gumbel_st")))


# --------------------------------------------------------------------------- reward


def reward_stage(ctx: RunContext) -> None:
    """Reward fine-tuning from the softdimo_gan generator (or the distilled one) -> reward@1."""
    config, stage_dir = ctx.config, ctx.stage_dir("reward")
    rcfg, tok = config.reward, ctx.tokenizer
    source, start = ctx.latest_generator(REWARD_SOURCES)
    rset = reward_set_from(rcfg.rewards, ctx)
    refiner = rewards.RewardRefiner(make_adapter(ctx.teacher.model, config.distill), config.distill, rcfg,
                                    tok.model, rset, (tok.grid, tok.grid), ctx.mesh)
    frozen = {"teacher": ctx.teacher.params, "tokenizer": tok.params, "reward": rset.params}
    t0 = time.time()
    result = phases.train_refinement(
        "reward", refiner, refiner.init_state, (start.state,), rcfg, stage_dir, batch_fn=lambda step: None,
        frozen=frozen, keep=config.checkpoint.keep,
        fingerprint=ctx.identity("reward", "reward", upstream=(source,)))
    ctx.record_time("reward_train", time.time() - t0)
    params = generator_params(result.state, config.distill.sample.use_ema)
    ctx.generators["reward"] = GeneratorRun(state=result.state, params=params)
    fp = ctx.identity("reward@1", "reward", "evaluation", upstream=("reward", "classifier"))
    refined_row(ctx, stage_dir, "reward@1", fp, params, refiner.mesh)


# --------------------------------------------------------------------------- TTEO


def tteo_rows(ctx: RunContext, steps_list, stage_dir: str) -> dict:
    config, model, tok, mesh = ctx.config, ctx.teacher.model, ctx.tokenizer, ctx.mesh
    _, source = ctx.latest_generator(TTEO_SOURCES)
    rset = reward_set_from(config.tteo.rewards, ctx)
    eval_rset = reward_set_from(config.reward.eval_rewards, ctx)
    labels = eval_labels(ctx)
    bs = int(config.evaluation.batch_size)
    decode = jax.jit(lambda tp, out: decode_images(tok.model, tp, out, model.num_bits, model.splits))
    rows = {}
    for k in steps_list:
        tcfg = config.tteo.copy_and_resolve_references()
        tcfg.steps = int(k)
        sample = tteo_sampler_from_config(model, tok.model, rset, config.distill, tcfg, (tok.grid, tok.grid), mesh)
        t0 = time.time()
        images, r0, r1 = [], [], []
        for i, padded, n in padded_label_batches(labels, bs, mesh.size):
            # Same rng stream as the plain student rows (sample_student_images), so K = 0
            # would reproduce the source row exactly.
            out = sample(source.params, tok.params, rset.params,
                         jax.random.fold_in(jax.random.PRNGKey(int(config.seed) + SeedOffsets.STUDENT_ROWS), i),
                         padded)
            imgs = decode(tok.params, {"tokens": out["tokens"]} if "tokens" in out else {"bits": out["bits"]})
            images.append(np.asarray(imgs)[:n])
            r0.append(np.asarray(out["reward_init"])[:n])
            r1.append(np.asarray(out["reward_final"])[:n])
        images = np.concatenate(images)
        seconds = time.time() - t0
        row = evaluate_row(ctx, eval_rset, images, labels)
        row.update(
            soft_reward_before=float(np.mean(np.concatenate(r0))),
            soft_reward_after=float(np.mean(np.concatenate(r1))),
            cost_forward=float(sample.cost["forward"]), cost_backward=float(sample.cost["backward"]),
            seconds_per_image=seconds / len(labels),
        )
        name = f"tteo_k{k}@1"
        write_row(ctx, stage_dir, name, images, row)
        rows[name] = row
    return rows


def tteo_stage(ctx: RunContext) -> None:
    """TTEO with K in config.tteo.eval_steps (default 2 and 4) -> tteo_k2@1, tteo_k4@1."""
    config, stage_dir = ctx.config, ctx.stage_dir("tteo")
    steps_list = tuple(int(k) for k in config.tteo.eval_steps)
    source, _ = ctx.latest_generator(TTEO_SOURCES)
    fp = ctx.identity("tteo", "reward", "tteo", "evaluation", upstream=(source, "classifier"),
                      steps=list(steps_list))
    rows = artifacts.load_rows(stage_dir, fp)
    if rows is None:
        rows = tteo_rows(ctx, steps_list, stage_dir)
        artifacts.save_rows(stage_dir, fp, rows)
    ctx.add_rows(rows)
