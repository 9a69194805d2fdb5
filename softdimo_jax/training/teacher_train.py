"""Teacher (masked diffusion model) training with MaskBit's objective.

Per sample: r = mask_schedule(u), u ~ U(0, 1) (arccos: r = arccos(u)/(π/2)); each of the
L·S sub-tokens is masked independently with probability r (per-split masking: the splits
of one token are masked independently); class labels are replaced by the drop label with
probability `class_dropout` (for classifier-free guidance); the loss is cross-entropy with
label smoothing over ALL positions (masked and visible), as MaskBit trains.
AdamW with linear warm-up and cosine decay; EMA of the parameters (with `ema_warmup`, the
decay ramps up as min(ema_decay, (1 + step) / (10 + step)) so the random initialisation
does not linger in the average).

Written once for every scale: a batch holds either precomputed token ids ("tokens",
(B, L) full ids) or images ("image"), which the frozen tokenizer (passed in `frozen`)
encodes inside the jitted step — the ImageNet path (`configs/maskbit_imagenet256_teacher.py`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from softdimo_jax.models import lfq
from softdimo_jax.models.maskbit_bert import LFQBert, maskbit_bert_from_config
from softdimo_jax.training.trainer import Trainer, ema_rate, ema_update, make_optimizer


def mask_ratio(u, schedule: str = "arccos"):
    """Masking fraction for uniform u ∈ [0, 1) (traceable)."""
    if schedule == "arccos":
        return jnp.arccos(u) / (math.pi / 2)
    if schedule == "cosine":
        return jnp.cos(u * math.pi / 2)
    if schedule == "linear":
        return 1.0 - u
    raise ValueError(f"unknown teacher mask_schedule {schedule!r}; use arccos, cosine or linear")


def teacher_from_config(model_cfg, num_tokens: int, num_bits: int) -> LFQBert:
    return maskbit_bert_from_config(model_cfg, num_tokens=int(num_tokens), num_bits=int(num_bits))


def mask_subtokens(rng, sub_tokens, mask_token: int, schedule: str = "arccos"):
    """(B, L, S) ids -> (masked ids, mask (B, L, S) bool): Bernoulli(r) per sub-token."""
    k_r, k_m = jax.random.split(rng)
    b = sub_tokens.shape[0]
    r = mask_ratio(jax.random.uniform(k_r, (b,)), schedule)
    mask = jax.random.uniform(k_m, sub_tokens.shape) < r[:, None, None]
    return jnp.where(mask, mask_token, sub_tokens), mask


def make_teacher_phase(model: LFQBert, cfg, tokenizer=None):
    """(init_fn, step_fn) for the Trainer. `cfg` = config.teacher.train. With `tokenizer`
    (a ConvVQModel), batches may carry images; its params come in `frozen["tokenizer"]`."""
    opt = make_optimizer(cfg.learning_rate, cfg.num_steps, cfg.warmup_steps, "cosine",
                         weight_decay=cfg.weight_decay, b1=cfg.b1, b2=cfg.b2, grad_clip=cfg.grad_clip)
    splits, num_bits = model.splits, model.num_bits
    use_ema = cfg.ema_decay > 0

    def init_fn(rng):
        tokens = jnp.zeros((1, model.num_tokens, splits), jnp.int32)
        params = model.init(rng, tokens, jnp.zeros((1,), jnp.int32))["params"]
        state = {"params": params, "opt": opt.init(params)}
        if use_ema:
            state["ema"] = params
        return state

    def batch_tokens(batch, frozen):
        if "tokens" in batch:
            ids = batch["tokens"]
        elif "image" in batch:
            if tokenizer is None or not frozen or "tokenizer" not in frozen:
                raise ValueError("image batches need the frozen tokenizer (frozen={'tokenizer': params})")
            enc = tokenizer.apply({"params": frozen["tokenizer"]}, batch["image"], method=tokenizer.encode)
            ids = enc["indices"].reshape(enc["indices"].shape[0], -1)
        else:
            raise KeyError(f"teacher batches need 'tokens' or 'image', got {sorted(batch)}")
        if ids.shape[1] != model.num_tokens:
            raise ValueError(f"batch has {ids.shape[1]} tokens per image, the teacher expects {model.num_tokens}")
        return lfq.split_indices(ids, num_bits, splits)

    def step_fn(state, batch, rng, step, frozen):
        sub = batch_tokens(batch, frozen)
        labels = batch["label"]
        k_mask, k_drop, k_dropout = jax.random.split(rng, 3)
        inputs, mask = mask_subtokens(k_mask, sub, model.mask_token, cfg.mask_schedule)
        drop = jax.random.uniform(k_drop, labels.shape) < cfg.class_dropout
        targets = optax.smooth_labels(jax.nn.one_hot(sub, model.vocab_size), cfg.label_smoothing)

        def loss_fn(params):
            logits = model.apply({"params": params}, inputs, labels, drop_label_mask=drop,
                                 deterministic=False, rngs={"dropout": k_dropout})
            ce = optax.softmax_cross_entropy(logits, targets)  # (B, L, S)
            hits = (jnp.argmax(logits, -1) == sub).astype(jnp.float32)
            masked_acc = jnp.sum(hits * mask) / jnp.maximum(jnp.sum(mask), 1)
            return jnp.mean(ce), masked_acc

        (loss, masked_acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "opt": opt_state}
        if use_ema:
            decay = ema_rate(step, cfg.ema_decay) if cfg.ema_warmup else cfg.ema_decay
            new["ema"] = ema_update(state["ema"], params, decay)
        return new, {"loss": loss, "masked_accuracy": masked_acc, "grad_norm": optax.global_norm(grads)}

    return init_fn, step_fn


def train_teacher(model: LFQBert, train_cfg, batch_fn, stage_dir, *, tokenizer=None, frozen=None,
                  mesh=None, fsdp: bool = False, seed: int = 0, keep: int = 2,
                  config_json: Any = None, **trainer_kwargs):
    """Trains (or restores) the teacher. Returns (state, TrainResult); sample from
    state["ema"] when `ema_decay` > 0."""
    init_fn, step_fn = make_teacher_phase(model, train_cfg, tokenizer)
    trainer = Trainer(
        "teacher", stage_dir, init_fn, step_fn, batch_fn, num_steps=train_cfg.num_steps,
        seed=seed, mesh=mesh, fsdp=fsdp, frozen=frozen, checkpoint_every=train_cfg.checkpoint_every,
        keep=keep, log_every=train_cfg.log_every, config_json=config_json, **trainer_kwargs,
    )
    result = trainer.run()
    return result.state, result


def train_teacher_on_images(config, workdir: str):
    """Full-scale entry: teacher training on a tfds image dataset with a frozen converted
    tokenizer (configs/maskbit_imagenet256_teacher.py). Returns the final Trainer state."""
    import os

    from softdimo_jax import parallel
    from softdimo_jax.convert import load_converted
    from softdimo_jax.data import tfds_images

    if not config.tokenizer_checkpoint:
        raise ValueError("set --config.tokenizer_checkpoint to a `softdimo_jax.convert` tokenizer directory")
    tokenizer, tok_params = load_converted(config.tokenizer_checkpoint)
    size = int(config.data.image_size)
    grid = size // tokenizer.downsample_factor
    model = teacher_from_config(config.teacher.model, grid * grid, tokenizer.num_bits)
    source = tfds_images.TfdsImageSource(config.data.name, config.data.split,
                                         config.data.data_dir or None, image_size=size)
    batch_fn = tfds_images.make_batch_fn(source, int(config.teacher.train.batch_size), config.seed)
    mesh = parallel.make_mesh(config.mesh.num_devices or None, fsdp=config.mesh.fsdp)
    state, _ = train_teacher(
        model, config.teacher.train, batch_fn, os.path.join(workdir, "teacher"), tokenizer=tokenizer,
        frozen={"tokenizer": tok_params}, mesh=mesh, fsdp=config.mesh.fsdp > 1, seed=config.seed,
        keep=config.checkpoint.keep, config_json=_config_json(config),
    )
    return state


def _config_json(config):
    from softdimo_jax.training.checkpointing import to_jsonable

    return to_jsonable({k: config[k] for k in ("data", "tokenizer", "teacher")})


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "teacher training config", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "checkpoint / summary directory")

    def _run(_):
        if not workdir.value or config.value is None:
            raise app.UsageError("--config and --workdir are required")
        train_teacher_on_images(config.value, workdir.value)

    app.run(_run, argv)


if __name__ == "__main__":
    main()
