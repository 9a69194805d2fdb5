"""GAN refinement of the one-step generator through soft embeddings (SPEC §1.3).

Real images are tokenised once by the tokenizer encoder (`sampling.codec.encode_dataset`
on digits; the tfds pipeline at scale) and fed as token ids. Every step:
- fake = the generator's teacher-side soft bits E[bits] under softmax(z_θ/τ) (or the
  Gumbel straight-through one-hot, the ablation switch `soft.mode`);
- in real and fake alike a random fraction r ~ U[0, r_max] of positions (an exact count
  round(r·L) per sample) is replaced by MASK (zero bits) — r = 0 overfits;
- both go through the FROZEN teacher (an explicit, non-donated argument) which returns
  its per-layer features; light heads (models/discriminator.py) read configured layers,
  conditioned on r and the class, and output real/fake logits;
- generator: L = L_DiMO + w_GAN · softplus(−D(fake)) (non-saturating), so its gradient
  is the Di[M]O cotangent g/B on the logits plus w_GAN times the GAN gradient that flows
  back through the teacher and the soft embedding;
- discriminator: BCE on sg(fake) and real, plus an optional R1 (on the tapped features of
  real inputs: the heads are the only trainable part) or LeCam term; own optimiser/lr;
- the Di[M]O auxiliary update and the EMA keep running (core/dimo.py does them).

This file holds the GAN-specific pieces; `GanRefiner` composes them with the distillation
step of `softdimo_jax.core.dimo` (its loss enters as the step's explicit `extra_loss`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from softdimo_jax.core.dimo import Distiller, refine_distill_config
from softdimo_jax.core.masking import mask_positions, random_position_mask
from softdimo_jax.core.optim import make_optimizer
from softdimo_jax.models import lfq
from softdimo_jax.models.discriminator import discriminator_from_config, init_discriminator
from softdimo_jax.models.soft_embed import SoftEmbedder


# --------------------------------------------------------------------------- real inputs


def real_bits_from_indices(indices, num_bits: int):
    """(B, h, w) or (B, L) tokenizer indices -> (B, L, bits) ±1, split-major. LFQ bit k of
    the full index is bit k of the concatenated split bits (split 0 = low bits), so the
    tokenizer's index bits ARE the teacher's input bits."""
    idx = jnp.asarray(indices, jnp.int32).reshape(indices.shape[0], -1)
    return lfq.indices_to_bits(idx, num_bits, jnp.float32)


# --------------------------------------------------------------------------- losses


def teacher_features(teacher, teacher_params, bits, labels):
    """Frozen teacher features of (B, L, bits) inputs (conditional, deterministic)."""
    _, feats = teacher.apply({"params": teacher_params}, labels=labels, input_bits=bits,
                             deterministic=True, return_features=True)
    return feats


def generator_gan_loss(d_logits_fake):
    """Non-saturating: E softplus(−D(fake)), averaged over batch and heads."""
    return jnp.mean(jax.nn.softplus(-d_logits_fake))


def discriminator_bce(d_real, d_fake):
    return jnp.mean(jax.nn.softplus(-d_real)) + jnp.mean(jax.nn.softplus(d_fake))


def lecam_term(d_real, d_fake, ema_real, ema_fake):
    """LeCam regulariser (Tseng et al. 2021): pulls D(real) towards the EMA of D(fake) and
    vice versa, which bounds the discriminator on small data."""
    return jnp.mean(jax.nn.relu(d_real - ema_fake) ** 2) + jnp.mean(jax.nn.relu(ema_real - d_fake) ** 2)


@flax.struct.dataclass
class DiscState:
    params: Any
    opt_state: Any
    lecam_ema: jax.Array  # (2,): EMA of mean D(real), mean D(fake)


def make_disc_optimizer(gan_config) -> optax.GradientTransformation:
    """Adam at a constant disc_lr (eps 1e-8), clipped when disc_grad_clip > 0."""
    return make_optimizer(gan_config.disc_lr, optimizer="adam", b1=gan_config.disc_b1,
                          b2=gan_config.disc_b2, grad_clip=gan_config.disc_grad_clip)


def init_disc_state(disc_params, tx) -> DiscState:
    return DiscState(disc_params, tx.init(disc_params), jnp.zeros((2,), jnp.float32))


def disc_loss_fn(disc, gan_config):
    """-> fn(d_params, feats_real, r_real, labels_real, feats_fake, r_fake, labels_fake,
    lecam_ema) -> (loss, metrics). Fake features must already be stop-gradiented."""
    reg = str(gan_config.disc_reg)
    if reg not in ("none", "r1", "lecam"):
        raise ValueError(f"gan.disc_reg must be 'none', 'r1' or 'lecam', got {reg!r}")
    layers = tuple(disc.layers)

    def loss_fn(d_params, feats_real, r_real, labels_real, feats_fake, r_fake, labels_fake, lecam_ema):
        apply = lambda f, r, y: disc.apply({"params": d_params}, f, r, y)
        d_fake = apply(feats_fake, r_fake, labels_fake)

        if reg == "r1":
            # R1 on the tapped features only: the rest of the teacher is frozen and untapped
            # layers do not reach the heads.
            def d_real_of(tapped):
                feats = list(feats_real)
                for layer, t in zip(layers, tapped):
                    feats[layer] = t
                out = apply(tuple(feats), r_real, labels_real)
                return jnp.sum(out), out

            tapped = tuple(feats_real[layer] for layer in layers)
            grads, d_real = jax.grad(d_real_of, has_aux=True)(tapped)
            penalty = sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in grads) / d_real.shape[0]
            reg_loss = 0.5 * gan_config.r1_gamma * penalty
        else:
            d_real = apply(feats_real, r_real, labels_real)
            reg_loss = jnp.zeros((), jnp.float32)
            if reg == "lecam":
                reg_loss = gan_config.lecam_weight * lecam_term(d_real, d_fake, lecam_ema[0], lecam_ema[1])

        bce = discriminator_bce(d_real, d_fake)
        metrics = {
            "disc_bce": bce,
            "disc_reg": reg_loss,
            "d_real": jnp.mean(d_real),
            "d_fake": jnp.mean(d_fake),
            "disc_acc": 0.5 * (jnp.mean(d_real > 0) + jnp.mean(d_fake < 0)),
        }
        return bce + reg_loss, metrics

    return loss_fn


def disc_update(disc, tx, gan_config) -> Callable:
    """-> fn(DiscState, feats_real, r_real, labels_real, feats_fake, r_fake, labels_fake)
    -> (DiscState, metrics)."""
    loss_fn = disc_loss_fn(disc, gan_config)

    def update(state: DiscState, feats_real, r_real, labels_real, feats_fake, r_fake, labels_fake):
        feats_real = jax.lax.stop_gradient(feats_real)
        feats_fake = jax.lax.stop_gradient(feats_fake)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, feats_real, r_real, labels_real, feats_fake, r_fake, labels_fake, state.lecam_ema)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = gan_config.lecam_decay
        ema = decay * state.lecam_ema + (1 - decay) * jnp.stack([metrics["d_real"], metrics["d_fake"]])
        metrics = dict(metrics, disc_loss=loss)
        return DiscState(params, opt_state, ema), metrics

    return update


# --------------------------------------------------------------------------- the refinement step


def make_refine_distiller(adapter, distill_config, phase_config, mesh=None) -> Distiller:
    """The Di[M]O half of a refinement phase (GAN or reward): the phase's generator
    optimiser and batch size, Di[M]O term scaled by `w_dimo`."""
    return Distiller(adapter, refine_distill_config(distill_config, phase_config), mesh,
                     w_dimo=float(phase_config.get("w_dimo", 1.0)))


@flax.struct.dataclass
class GanState:
    dimo: Any  # core.dimo.DistillState
    disc: DiscState


class GanRefiner:
    """Builds the GAN phase from a distillation adapter and configs.

    step(state, batch, rng, teacher_params, tokenizer_params=None) -> (state, metrics), with
    batch = {"indices": (B, L) real token ids, "labels": (B,)} (tokens encoded once, the
    digits path) or {"image": (B, H, W, C) in [0, 1], "label": (B,)} (encoded in the step
    by the frozen tokenizer encoder, the ImageNet path; needs `tokenizer`). Fits the
    Trainer contract through `trainer_step_fn` (frozen = {"teacher"[, "tokenizer"]}).
    """

    def __init__(self, adapter, distill_config, gan_config, mesh=None, tokenizer=None):
        self.adapter = adapter
        self.config = gan_config
        self.tokenizer = tokenizer
        self.distiller = make_refine_distiller(adapter, distill_config, gan_config, mesh)
        self.mesh = self.distiller.mesh
        self.embedder = SoftEmbedder(mode=str(gan_config.soft_mode), tau=float(gan_config.soft_tau))
        self.teacher = adapter.teacher
        self.num_tokens = adapter.num_tokens
        self.num_bits = adapter.student.num_bits
        self.disc = discriminator_from_config(gan_config, adapter.num_tokens, adapter.num_classes)
        self.disc_tx = make_disc_optimizer(gan_config)
        self._disc_update = disc_update(self.disc, self.disc_tx, gan_config)

    def init_disc(self, rng, teacher_params):
        b = 2
        feats = jax.eval_shape(
            lambda p: teacher_features(self.teacher, p, jnp.zeros((b, self.num_tokens, self.num_bits)),
                                       jnp.zeros((b,), jnp.int32)), teacher_params)
        return init_discriminator(self.disc, rng, feats, b)

    def init_state(self, rng, dimo_state, teacher_params) -> GanState:
        d_params = self.init_disc(rng, teacher_params)
        return GanState(self.distiller.restart_from(dimo_state), init_disc_state(d_params, self.disc_tx))

    def _fake_loss(self, d_params, teacher_params, z, labels, rng):
        k_soft, k_mask = jax.random.split(rng)
        bits = self.embedder.bits(z, k_soft)
        mask, r = random_position_mask(k_mask, z.shape[0], self.num_tokens, self.config.r_max)
        feats = teacher_features(self.teacher, teacher_params, mask_positions(bits, mask), labels)
        d_fake = self.disc.apply({"params": d_params}, feats, r, labels)
        loss = generator_gan_loss(d_fake)
        stats = {"gan_g_loss": loss}
        return self.config.w_gan * loss, (stats, (jax.tree.map(jax.lax.stop_gradient, feats), r))

    def real_batch(self, batch, tokenizer_params):
        """-> (real bits (B, L, bits) ±1, labels (B,))."""
        if "indices" in batch:
            return real_bits_from_indices(batch["indices"], self.num_bits), jnp.asarray(batch["labels"], jnp.int32)
        if "image" not in batch:
            raise KeyError(f"GAN batch needs 'indices'+'labels' or 'image'+'label', got {sorted(batch)}")
        if self.tokenizer is None or tokenizer_params is None:
            raise ValueError("image batches need the tokenizer: GanRefiner(..., tokenizer=model) and "
                             "frozen['tokenizer'] = its params")
        idx = self.tokenizer.apply({"params": tokenizer_params}, batch["image"],
                                   method=type(self.tokenizer).encode)["indices"]
        return real_bits_from_indices(jax.lax.stop_gradient(idx), self.num_bits), jnp.asarray(batch["label"], jnp.int32)

    def step(self, state: GanState, batch, rng, teacher_params, tokenizer_params=None):
        k_dimo, k_real = jax.random.split(rng)
        extra = lambda z, labels, k: self._fake_loss(state.disc.params, teacher_params, z, labels, k)
        dimo, metrics, out = self.distiller.step_fn(state.dimo, teacher_params, k_dimo, extra_loss=extra)
        (feats_fake, r_fake), labels_fake = out

        real_bits, labels_real = self.real_batch(batch, tokenizer_params)
        mask, r_real = random_position_mask(k_real, real_bits.shape[0], self.num_tokens, self.config.r_max)
        feats_real = teacher_features(self.teacher, teacher_params, mask_positions(real_bits, mask), labels_real)
        disc, d_metrics = self._disc_update(state.disc, feats_real, r_real, labels_real,
                                            feats_fake, r_fake, labels_fake)
        metrics = dict(metrics, **d_metrics)
        metrics["loss"] = metrics["gen_loss"]
        return GanState(dimo, disc), metrics

    def trainer_step_fn(self):
        """`step_fn(state, batch, rng, step, frozen)` for runtime.trainer.Trainer."""
        return lambda state, batch, rng, step, frozen: self.step(
            state, batch, rng, frozen["teacher"], frozen.get("tokenizer"))
