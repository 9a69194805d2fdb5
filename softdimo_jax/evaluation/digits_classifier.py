"""The digits evaluation network: a small CNN trained on the digits train split.

It stands in for Inception-v3 on this domain (Inception was trained on ImageNet photos and
says little about 16×16 grey digits):
- its class probabilities give the accuracy w.r.t. the requested label (our IS-like number);
- its penultimate features (after ReLU, like Inception's pool features) feed the Fréchet
  distance ("FD-digits", our FID-like number) and k-NN precision/recall.
Numbers from it are comparable only with each other, never with published FIDs.

Training (`train_classifier`) uses the shared Trainer: Adam, cosine decay, random ±2-pixel
shifts as augmentation (so slightly off-centre generated digits are still recognised).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from softdimo_jax.core.optim import make_optimizer
from softdimo_jax.data.digits import make_batch_fn
from softdimo_jax.runtime.trainer import Trainer


class DigitsClassifier(nn.Module):
    """(B, S, S, C) images in [0, 1] (C = 1 or 3, S = `image_size`) -> logits (B, classes)
    and, with return_features, the (B, feature_dim) penultimate features."""

    num_classes: int = 10
    width: int = 32
    feature_dim: int = 64
    image_size: int = 16

    @nn.compact
    def __call__(self, images, return_features: bool = False):
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"classifier input must be NHWC with 1 or 3 channels, got {images.shape}")
        x = jnp.asarray(images, jnp.float32)
        if x.shape[-1] == 3:
            x = jnp.mean(x, axis=-1, keepdims=True)  # digits are grey; 3 channels are copies
        if x.shape[1:3] != (self.image_size, self.image_size):
            x = jax.image.resize(x, (x.shape[0], self.image_size, self.image_size, 1), "linear")
        x = x * 2.0 - 1.0
        x = nn.relu(nn.Conv(self.width, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(self.width, (3, 3), name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3), name="conv3")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, name="fc1")(x))
        feats = nn.relu(nn.Dense(self.feature_dim, name="features")(x))
        logits = nn.Dense(self.num_classes, name="head")(feats)
        return (logits, feats) if return_features else logits


def classifier_from_config(cfg) -> DigitsClassifier:
    return DigitsClassifier(
        num_classes=int(cfg.num_classes), width=int(cfg.width), feature_dim=int(cfg.feature_dim),
        image_size=int(cfg.image_size),
    )


def random_shift(rng, images, max_shift: int):
    """Shifts each image by an integer offset in [−max_shift, max_shift]² (zero fill)."""
    if max_shift <= 0:
        return images
    b, h, w, c = images.shape
    pad = max_shift
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * pad + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def make_classifier_phase(model: DigitsClassifier, cfg, channels: int):
    """(init_fn, step_fn) for the Trainer: cross-entropy with shift augmentation."""
    opt = make_optimizer(cfg.learning_rate, schedule="cosine", num_steps=cfg.num_steps,
                         warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay)
    size = int(cfg.image_size)

    def init_fn(rng):
        params = model.init(rng, jnp.zeros((1, size, size, channels)))["params"]
        return {"params": params, "opt": opt.init(params)}

    def step_fn(state, batch, rng, step, frozen):
        images = random_shift(rng, batch["image"], int(cfg.max_shift))

        def loss_fn(params):
            logits = model.apply({"params": params}, images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
            return loss, acc

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt": opt_state}, {"loss": loss, "train_accuracy": acc}

    return init_fn, step_fn


def train_classifier(cfg, images, labels, stage_dir: str | None, mesh=None, seed: int = 0,
                     config_json: Any = None, **trainer_kwargs):
    """Trains (or restores, when `stage_dir` holds the finished run) the classifier.

    Returns (model, params, TrainResult)."""
    model = classifier_from_config(cfg)
    init_fn, step_fn = make_classifier_phase(model, cfg, images.shape[-1])
    trainer = Trainer(
        "classifier", stage_dir, init_fn, step_fn,
        make_batch_fn(images, labels, int(cfg.batch_size), seed + 17),
        num_steps=int(cfg.num_steps), seed=seed, mesh=mesh,
        checkpoint_every=int(cfg.num_steps), keep=1, log_every=int(cfg.log_every),
        config_json=config_json, **trainer_kwargs,
    )
    result = trainer.run()
    return model, result.state["params"], result


@functools.lru_cache(maxsize=8)
def _features_fn(model: DigitsClassifier):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, return_features=True))


def predict(model: DigitsClassifier, params, images, batch_size: int = 512):
    """(logits, features) as numpy, computed in fixed-size jitted batches (one compile)."""
    fn = _features_fn(model)
    images = np.asarray(images, np.float32)
    n = len(images)
    logits, feats = [], []
    for i in range(0, n, batch_size):
        chunk = images[i : i + batch_size]
        keep = len(chunk)
        if keep < batch_size:  # pad the tail so one compiled shape serves every batch
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - keep, 0)])
        lg, ft = fn(params, chunk)
        logits.append(np.asarray(lg)[:keep])
        feats.append(np.asarray(ft)[:keep])
    return np.concatenate(logits), np.concatenate(feats)
