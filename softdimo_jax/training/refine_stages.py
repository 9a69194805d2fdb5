"""Post-distillation stages of the digits main job (SPEC §1.3–1.5), after `distill`:

    softdimo_gan  Soft-Di[M]O + GAN from the distilled student        -> row softdimo_gan@1
    gumbel_gan    the same with Gumbel-softmax straight-through (ablation) -> gumbel_gan@1
    reward        reward fine-tuning from the softdimo_gan generator  -> reward@1
    tteo          TTEO sampling of the reward generator, K = 2 and 4  -> tteo_k2@1, tteo_k4@1
                  (or the single-K stages tteo_k2 / tteo_k4)

Each training stage is a `Trainer` run with checkpoints in <workdir>/<stage>/ (a finished
run is restored, not retrained); every stage caches its evaluation rows in rows.json next
to a fingerprint of the configs it depends on. Every row carries `reward` (the mean of the
configured reward set on the evaluated images: the digits classifier's log p(c | x)).
Rows are sampled exactly like `dimo@1` (hard tokens, same seed, EMA weights), so row
differences are paired.

Context read: mesh, data, tokenizer, teacher, evaluator, student (from distill).
Context written: softdimo_gan / gumbel_gan / reward -> {"state", "params"}.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.training import gan, rewards
from softdimo_jax.training.reward_finetune import RewardRefiner


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _jsonable(x):
    from softdimo_jax.training.checkpointing import to_jsonable

    return to_jsonable(x)


def _fingerprint(config, *keys):
    return {k: _jsonable(config[k]) for k in keys if k in config}


def _load_rows(stage_dir, fingerprint):
    path = os.path.join(stage_dir, "rows.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("config") == json.loads(json.dumps(fingerprint)):
            return cached["rows"]
    return None


def _save_rows(stage_dir, fingerprint, rows):
    if jax.process_index() != 0:
        return
    os.makedirs(stage_dir, exist_ok=True)
    path = os.path.join(stage_dir, "rows.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"config": fingerprint, "rows": rows}, f, indent=2)
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------- rewards & rows


def digits_reward_resources(ctx) -> dict:
    """Resources the built-in rewards need: the digits evaluation classifier."""
    ev = ctx["evaluator"]
    return dict(classifier_apply=lambda p, x: ev.model.apply({"params": p}, x),
                classifier_params=ev.params)


def reward_set_from(spec, ctx) -> rewards.RewardSet:
    return rewards.build_reward_set(spec, **digits_reward_resources(ctx))


def mean_reward(rset: rewards.RewardSet, images, labels, batch_size: int = 500) -> float:
    fn = jax.jit(lambda p, x, y: rset.total(p, x, y)[0])
    vals = [np.asarray(fn(rset.params, jnp.asarray(images[i : i + batch_size]),
                          jnp.asarray(labels[i : i + batch_size])))
            for i in range(0, len(images), batch_size)]
    return float(np.mean(np.concatenate(vals)))


def evaluate_row(ctx, rset, images, labels) -> dict:
    row = dict(ctx["evaluator"].evaluate(images, labels))
    row["reward"] = mean_reward(rset, images, labels)
    return row


def _eval_labels(config, ctx):
    from softdimo_jax.training.distill_stage import _class_ordered_labels

    return _class_ordered_labels(int(config.evaluation.num_samples), int(ctx["teacher"]["model"].num_classes))


def _student_images(config, ctx, params, mesh):
    from softdimo_jax.training.distill_stage import sample_student_images

    tok = ctx["tokenizer"]
    return sample_student_images(
        ctx["teacher"]["model"], params, tok["model"], tok["params"], config.distill,
        _eval_labels(config, ctx), "hard", mesh, int(config.evaluation.batch_size),
        seed=int(config.seed) + 2000)


def _grid_and_rows(config, stage_dir, name, images, row):
    from softdimo_jax.train import _save_grid

    _save_grid(stage_dir, name.replace("@", "_at"), images[: config.evaluation.grid_samples])
    _log(f"[{name}] " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))


class _StateTrainer:
    """Trainer whose initial state is built from arguments (the previous phase's state and
    the frozen models) instead of closed-over constants."""

    @staticmethod
    def make(init_from_args, args, **kwargs):
        from softdimo_jax.training.trainer import Trainer

        class T(Trainer):
            def init_state(self):
                return jax.jit(init_from_args, out_shardings=self.state_shardings)(*args)

        return T(init_fn=lambda rng: init_from_args(*args), **kwargs)


def _adapter(config, ctx):
    from softdimo_jax.training import distill

    return distill.make_adapter(ctx["teacher"]["model"], config.distill)


# --------------------------------------------------------------------------- GAN


def train_gan(config, ctx, stage_dir, gcfg, start_state, name):
    """Runs (or restores) a GAN phase from `start_state` (a DistillState)."""
    from softdimo_jax.data import digits

    refiner = gan.GanRefiner(_adapter(config, ctx), config.distill, gcfg, ctx["mesh"])
    tokens = np.asarray(ctx["tokenizer"]["train_tokens"], np.int32)
    labels = np.asarray(ctx["data"]["train"][1], np.int32)
    bs = int(gcfg.batch_size)
    local = digits.process_slice(bs)

    def batch_fn(step):
        idx = digits.batch_indices(len(tokens), bs, step, int(gcfg.seed) + 17)[local]
        return {"indices": tokens[idx], "labels": labels[idx]}

    teacher_params = ctx["teacher"]["params"]
    init = lambda s, tp: refiner.init_state(jax.random.PRNGKey(int(gcfg.seed)), s, tp)
    trainer = _StateTrainer.make(
        init, (start_state, teacher_params),
        name=name, stage_dir=stage_dir, step_fn=refiner.trainer_step_fn(), batch_fn=batch_fn,
        num_steps=int(gcfg.num_steps), seed=int(gcfg.seed), mesh=refiner.mesh,
        frozen={"teacher": teacher_params}, checkpoint_every=int(gcfg.ckpt_every),
        keep=int(config.checkpoint.keep), log_every=int(gcfg.log_every),
        config_json=dict(_fingerprint(config, "distill", "gan"), soft_mode=str(gcfg.soft_mode)),
    )
    result = trainer.run()
    trainer.close()
    return result.state, refiner


def _gan_stage(config, workdir, ctx, name, soft_mode):
    from softdimo_jax.train import add_rows

    stage_dir = os.path.join(workdir, name)
    gcfg = config.gan.copy_and_resolve_references()
    gcfg.soft_mode = soft_mode
    t0 = time.time()
    state, refiner = train_gan(config, ctx, stage_dir, gcfg, ctx["student"]["state"], name)
    ctx["metrics"].setdefault("timings", {})[f"{name}_train"] = round(time.time() - t0, 2)
    params = state.dimo.ema_params if config.distill.sample.use_ema else state.dimo.gen_params
    ctx[name] = dict(state=state.dimo, params=params)

    fp = dict(_fingerprint(config, "seed", "distill", "gan", "reward", "evaluation"), soft_mode=soft_mode)
    rows = _load_rows(stage_dir, fp)
    if rows is None:
        rset = reward_set_from(config.reward.eval_rewards, ctx)
        images = _student_images(config, ctx, params, refiner.mesh)
        row = evaluate_row(ctx, rset, images, _eval_labels(config, ctx))
        _grid_and_rows(config, stage_dir, f"{name}@1", images, row)
        rows = {f"{name}@1": row}
        _save_rows(stage_dir, fp, rows)
    add_rows(ctx, rows)


def softdimo_gan_stage(config, workdir: str, ctx: dict) -> None:
    """Soft-Di[M]O + GAN (soft embeddings into the frozen teacher) -> softdimo_gan@1."""
    _gan_stage(config, workdir, ctx, "softdimo_gan", str(config.gan.soft_mode))


def gumbel_gan_stage(config, workdir: str, ctx: dict) -> None:
    """Ablation: Gumbel-softmax straight-through instead of soft embeddings -> gumbel_gan@1."""
    _gan_stage(config, workdir, ctx, "gumbel_gan", str(config.gan.get("ablation_soft_mode", "gumbel_st")))


# --------------------------------------------------------------------------- reward


def reward_stage(config, workdir: str, ctx: dict) -> None:
    """Reward fine-tuning from the softdimo_gan generator (or the distilled one) -> reward@1."""
    from softdimo_jax.train import add_rows

    stage_dir = os.path.join(workdir, "reward")
    rcfg = config.reward
    source = "softdimo_gan" if "softdimo_gan" in ctx else "student"
    start = ctx[source]["state"]
    rset = reward_set_from(rcfg.rewards, ctx)
    tok = ctx["tokenizer"]
    grid = (tok["grid"], tok["grid"])
    refiner = RewardRefiner(_adapter(config, ctx), config.distill, rcfg, tok["model"], rset, grid, ctx["mesh"])
    frozen = {"teacher": ctx["teacher"]["params"], "tokenizer": tok["params"], "reward": rset.params}
    t0 = time.time()
    trainer = _StateTrainer.make(
        refiner.init_state, (start,),
        name="reward", stage_dir=stage_dir, step_fn=refiner.trainer_step_fn(),
        batch_fn=lambda step: None, num_steps=int(rcfg.num_steps), seed=int(rcfg.seed),
        mesh=refiner.mesh, frozen=frozen, checkpoint_every=int(rcfg.ckpt_every),
        keep=int(config.checkpoint.keep), log_every=int(rcfg.log_every),
        config_json=dict(_fingerprint(config, "distill", "gan", "reward"), source=source),
    )
    result = trainer.run()
    trainer.close()
    ctx["metrics"].setdefault("timings", {})["reward_train"] = round(time.time() - t0, 2)
    state = result.state
    params = state.ema_params if config.distill.sample.use_ema else state.gen_params
    ctx["reward"] = dict(state=state, params=params)

    fp = dict(_fingerprint(config, "seed", "distill", "gan", "reward", "evaluation"), source=source)
    rows = _load_rows(stage_dir, fp)
    if rows is None:
        images = _student_images(config, ctx, params, refiner.mesh)
        row = evaluate_row(ctx, reward_set_from(config.reward.eval_rewards, ctx), images, _eval_labels(config, ctx))
        _grid_and_rows(config, stage_dir, "reward@1", images, row)
        rows = {"reward@1": row}
        _save_rows(stage_dir, fp, rows)
    add_rows(ctx, rows)


# --------------------------------------------------------------------------- TTEO


def tteo_rows(config, ctx, steps_list, stage_dir) -> dict:
    from softdimo_jax import parallel
    from softdimo_jax.sampling.student import decode_images
    from softdimo_jax.sampling.tteo import tteo_sampler_from_config

    source = next(s for s in ("reward", "softdimo_gan", "student") if s in ctx)
    params = ctx[source]["params"]
    model = ctx["teacher"]["model"]
    tok = ctx["tokenizer"]
    rset = reward_set_from(config.tteo.rewards, ctx)
    eval_rset = reward_set_from(config.reward.eval_rewards, ctx)
    labels = _eval_labels(config, ctx)
    mesh = ctx["mesh"]
    bs = int(config.evaluation.batch_size)
    decode = jax.jit(lambda tp, out: decode_images(tok["model"], tp, out, model.num_bits, model.splits))
    rows = {}
    for k in steps_list:
        tcfg = config.tteo.copy_and_resolve_references()
        tcfg.steps = int(k)
        sample = tteo_sampler_from_config(model, tok["model"], rset, config.distill, tcfg,
                                          (tok["grid"], tok["grid"]), mesh)
        t0 = time.time()
        images, r0, r1 = [], [], []
        for i in range(0, len(labels), bs):
            lab = labels[i : i + bs]
            pad = -len(lab) % mesh.size
            padded = np.concatenate([lab, np.zeros(pad, np.int32)])
            # Same rng stream as the plain student rows (sample_student_images), so K = 0
            # would reproduce the source row exactly.
            out = sample(params, tok["params"], rset.params,
                         jax.random.fold_in(jax.random.PRNGKey(int(config.seed) + 2000), i), padded)
            imgs = decode(tok["params"], {"tokens": out["tokens"]} if "tokens" in out else {"bits": out["bits"]})
            images.append(np.asarray(imgs)[: len(lab)])
            r0.append(np.asarray(out["reward_init"])[: len(lab)])
            r1.append(np.asarray(out["reward_final"])[: len(lab)])
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
        _grid_and_rows(config, stage_dir, name, images, row)
        rows[name] = row
    return rows


def _tteo_stage(config, workdir, ctx, steps_list, stage_name):
    from softdimo_jax.train import add_rows

    stage_dir = os.path.join(workdir, stage_name)
    source = next(s for s in ("reward", "softdimo_gan", "student") if s in ctx)
    fp = dict(_fingerprint(config, "seed", "distill", "gan", "reward", "tteo", "evaluation"),
              source=source, steps=list(steps_list))
    rows = _load_rows(stage_dir, fp)
    if rows is None:
        rows = tteo_rows(config, ctx, steps_list, stage_dir)
        _save_rows(stage_dir, fp, rows)
    add_rows(ctx, rows)


def tteo_stage(config, workdir: str, ctx: dict) -> None:
    """TTEO with K in config.tteo.eval_steps (default 2 and 4) -> tteo_k2@1, tteo_k4@1."""
    _tteo_stage(config, workdir, ctx, tuple(int(k) for k in config.tteo.eval_steps), "tteo")


def tteo_k2_stage(config, workdir: str, ctx: dict) -> None:
    _tteo_stage(config, workdir, ctx, (2,), "tteo_k2")


def tteo_k4_stage(config, workdir: str, ctx: dict) -> None:
    _tteo_stage(config, workdir, ctx, (4,), "tteo_k4")


def refine_stages():
    """[(name, fn)] in pipeline order, for softdimo_jax.train.STAGES (after 'distill')."""
    return [("softdimo_gan", softdimo_gan_stage), ("gumbel_gan", gumbel_gan_stage),
            ("reward", reward_stage), ("tteo", tteo_stage)]


# --------------------------------------------------------------------------- stand-alone (ImageNet)


def run_gan_from_config(config, workdir: str) -> None:
    """GAN refinement of a distilled MaskBit at scale (configs/maskbit_imagenet256_gan.py).

    Reads the converted teacher/tokenizer (config.teacher_checkpoint /
    config.tokenizer_checkpoint), the finished distillation state in <workdir>/distill
    (softdimo_jax.training.distill_stage, same config.distill), and real images from tfds
    (config.data); writes <workdir>/gan."""
    from softdimo_jax import parallel
    from softdimo_jax.data import tfds_images
    from softdimo_jax.training import checkpointing, distill
    from softdimo_jax.training.distill_stage import _load_models

    dcfg, gcfg = config.distill, config.gan
    mesh = parallel.make_mesh(None if dcfg.num_devices in (-1, 0, None) else dcfg.num_devices, dcfg.fsdp)
    model, teacher_params, (tok_model, tok_params) = _load_models(config)
    if tok_model is None:
        raise ValueError("the GAN phase encodes real images: set --config.tokenizer_checkpoint")
    adapter = distill.make_adapter(model, dcfg)
    refiner = gan.GanRefiner(adapter, dcfg, gcfg, mesh, tokenizer=tok_model)
    distiller = distill.Distiller(adapter, dcfg, mesh)
    dimo_state = checkpointing.load_latest_state(
        os.path.join(workdir, "distill"), distiller.abstract_state(teacher_params), name="distill")
    source = tfds_images.TfdsImageSource(config.data.name, config.data.split, config.data.data_dir or None,
                                         image_size=int(config.data.image_size))
    init = lambda s, tp: refiner.init_state(jax.random.PRNGKey(int(gcfg.seed)), s, tp)
    trainer = _StateTrainer.make(
        init, (dimo_state, teacher_params),
        name="gan", stage_dir=os.path.join(workdir, "gan"), step_fn=refiner.trainer_step_fn(),
        batch_fn=tfds_images.make_batch_fn(source, int(gcfg.batch_size), int(gcfg.seed)),
        num_steps=int(gcfg.num_steps), seed=int(gcfg.seed), mesh=refiner.mesh, fsdp=refiner.distiller.fsdp,
        frozen={"teacher": teacher_params, "tokenizer": tok_params},
        checkpoint_every=int(gcfg.ckpt_every), keep=int(dcfg.keep_checkpoints),
        log_every=int(gcfg.log_every), config_json=_jsonable(config),
    )
    trainer.run()
    trainer.close()


def main() -> None:
    """python -m softdimo_jax.training.refine_stages --config=configs/maskbit_imagenet256_gan.py --workdir=..."""
    from softdimo_jax.training.distill_stage import run_entry

    run_entry(run_gan_from_config, "GAN-phase config file",
              "the distillation workdir (reads distill/, writes gan/)")


if __name__ == "__main__":
    main()
