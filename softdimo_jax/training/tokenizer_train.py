"""Tokenizer training: MaskBit's lookup-free ConvVQModel with reconstruction + LFQ losses.

loss = recon (L2 or L1 between decoded and input images)
     + commitment_cost · mean((sg(sign z) − z)²)
     + entropy_weight · (per-sample entropy − gamma · batch entropy)   [`lfq_losses`]
No GAN or perceptual loss: at the digits size, reconstruction alone gives sharp codes.
The same phase trains a full-size tokenizer from a tfds image batch_fn; at ImageNet scale
MaskBit adds perceptual + GAN terms, which are out of scope here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softdimo_jax.models.maskbit_tokenizer import ConvVQModel, lfq_losses, maskbit_tokenizer_from_config
from softdimo_jax.training.trainer import Trainer, make_optimizer


def tokenizer_from_config(model_cfg) -> ConvVQModel:
    return maskbit_tokenizer_from_config(model_cfg)


def make_tokenizer_phase(model: ConvVQModel, cfg, image_shape):
    """(init_fn, step_fn) for the Trainer. `cfg` = config.tokenizer.train;
    `image_shape` = (H, W, C)."""
    opt = make_optimizer(cfg.learning_rate, cfg.num_steps, cfg.warmup_steps, "cosine",
                         weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    if cfg.recon_loss not in ("l1", "l2"):
        raise ValueError(f"tokenizer.train.recon_loss must be 'l1' or 'l2', got {cfg.recon_loss!r}")

    def init_fn(rng):
        params = model.init(rng, jnp.zeros((1, *image_shape)))["params"]
        return {"params": params, "opt": opt.init(params)}

    def step_fn(state, batch, rng, step, frozen):
        images = batch["image"]

        def loss_fn(params):
            recon, enc = model.apply({"params": params}, images)
            err = recon - images
            recon_loss = jnp.mean(err**2) if cfg.recon_loss == "l2" else jnp.mean(jnp.abs(err))
            q = lfq_losses(enc["z"], cfg.commitment_cost, cfg.entropy_loss_weight,
                           cfg.entropy_loss_temperature, cfg.entropy_gamma)
            loss = recon_loss + q["quantizer_loss"]
            return loss, {"recon_loss": recon_loss, "commitment_loss": q["commitment_loss"],
                          "entropy_loss": q["entropy_loss"]}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt": opt_state}, {"loss": loss, **aux}

    return init_fn, step_fn


def train_tokenizer(model_cfg, train_cfg, batch_fn, image_shape, stage_dir, *, mesh=None,
                    seed: int = 0, keep: int = 2, config_json: Any = None, **trainer_kwargs):
    """Trains (or restores) the tokenizer. Returns (model, params, TrainResult)."""
    model = tokenizer_from_config(model_cfg)
    init_fn, step_fn = make_tokenizer_phase(model, train_cfg, image_shape)
    trainer = Trainer(
        "tokenizer", stage_dir, init_fn, step_fn, batch_fn, num_steps=train_cfg.num_steps,
        seed=seed, mesh=mesh, checkpoint_every=train_cfg.checkpoint_every, keep=keep,
        log_every=train_cfg.log_every, config_json=config_json, **trainer_kwargs,
    )
    result = trainer.run()
    return model, result.state["params"], result


@functools.lru_cache(maxsize=16)
def _encode_fn(model: ConvVQModel):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode)["indices"])


@functools.lru_cache(maxsize=16)
def _decode_fn(model: ConvVQModel):
    return jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.decode_tokens))


def in_fixed_batches(fn, x, batch_size: int):
    """fn over x in batches of exactly `batch_size` rows (the tail is padded, then cut), so
    one compiled shape serves every call."""
    x = np.asarray(x)
    n = len(x)
    out = []
    for i in range(0, n, batch_size):
        chunk = x[i : i + batch_size]
        keep = len(chunk)
        if keep < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - keep, 0)])
        out.append(np.asarray(fn(chunk))[:keep])
    return np.concatenate(out)


def encode_dataset(model: ConvVQModel, params, images, batch_size: int = 256) -> np.ndarray:
    """(N, H, W, C) images -> (N, h·w) int32 token ids (row-major), in jitted batches."""
    fn = _encode_fn(model)
    ids = in_fixed_batches(lambda x: fn(params, x.astype(np.float32)), images, batch_size)
    return ids.reshape(len(ids), -1).astype(np.int32)


def decode_tokens(model: ConvVQModel, params, tokens, grid: int, batch_size: int = 500) -> np.ndarray:
    """(N, L) token ids -> (N, H, W, C) images clipped to [0, 1]."""
    fn = _decode_fn(model)
    tokens = np.asarray(tokens, np.int32).reshape(-1, grid, grid)
    return np.clip(in_fixed_batches(lambda t: fn(params, t), tokens, batch_size), 0.0, 1.0)
