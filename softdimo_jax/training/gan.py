"""GAN refinement of the one-step generator through soft embeddings (SPEC §1.3).

Real images are tokenised once by the tokenizer encoder (±1 bits per token). Every step:
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
- the Di[M]O auxiliary update and the EMA keep running (distill.py does them).

This file holds the GAN-specific pieces; `make_gan_step` composes them with the
distillation step of `softdimo_jax.training.distill`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from softdimo_jax.models import lfq


# --------------------------------------------------------------------------- masking


def random_position_mask(rng, batch: int, length: int, r_max: float):
    """Per sample r ~ U[0, r_max]; exactly round(r·L) positions masked (argsort of noise).
    -> (mask (B, L) bool, r_eff (B,) = masked count / L, the value the heads condition on)."""
    if not 0.0 <= r_max < 1.0:
        raise ValueError(f"gan r_max must be in [0, 1), got {r_max}")
    r_rng, n_rng = jax.random.split(rng)
    r = jax.random.uniform(r_rng, (batch,), minval=0.0, maxval=r_max)
    k = jnp.round(r * length).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(n_rng, (batch, length)), axis=-1), axis=-1)
    mask = ranks < k[:, None]
    return mask, k.astype(jnp.float32) / length


def mask_positions(bits, mask):
    """(B, L, bits) with (B, L) mask -> MASK (zero bits) where mask is true."""
    return jnp.where(mask[..., None], jnp.zeros((), bits.dtype), bits)


def real_bits_from_indices(indices, num_bits: int):
    """(B, h, w) or (B, L) tokenizer indices -> (B, L, bits) ±1, split-major. LFQ bit k of
    the full index is bit k of the concatenated split bits (split 0 = low bits), so the
    tokenizer's index bits ARE the teacher's input bits."""
    idx = jnp.asarray(indices, jnp.int32).reshape(indices.shape[0], -1)
    return lfq.indices_to_bits(idx, num_bits, jnp.float32)


def encode_real_tokens(tokenizer, tokenizer_params, images, batch_size: int = 256):
    """Images (N, H, W, C) in [0, 1] (host array) -> (N, h, w) int32 indices, in batches."""
    import numpy as np

    enc = jax.jit(lambda p, x: tokenizer.apply({"params": p}, x, method=type(tokenizer).encode)["indices"])
    out = []
    for i in range(0, len(images), batch_size):
        out.append(np.asarray(enc(tokenizer_params, jnp.asarray(images[i : i + batch_size], jnp.float32))))
    return np.concatenate(out, axis=0)


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
    tx = optax.adam(gan_config.disc_lr, b1=gan_config.disc_b1, b2=gan_config.disc_b2)
    if gan_config.disc_grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(gan_config.disc_grad_clip), tx)
    return tx


def init_disc_state(disc_params, tx) -> DiscState:
    return DiscState(disc_params, tx.init(disc_params), jnp.zeros((2,), jnp.float32))


def disc_loss_fn(disc, gan_config):
    """-> fn(d_params, feats_real, r_real, feats_fake, r_fake, labels, lecam_ema) ->
    (loss, metrics). Fake features must already be stop-gradiented by the caller."""
    reg = str(gan_config.disc_reg)
    if reg not in ("none", "r1", "lecam"):
        raise ValueError(f"gan.disc_reg must be 'none', 'r1' or 'lecam', got {reg!r}")
    layers = tuple(disc.layers)

    def loss_fn(d_params, feats_real, r_real, feats_fake, r_fake, labels, lecam_ema):
        apply = lambda f, r: disc.apply({"params": d_params}, f, r, labels)
        d_fake = apply(feats_fake, r_fake)

        if reg == "r1":
            # R1 on the tapped features only: the rest of the teacher is frozen and untapped
            # layers do not reach the heads.
            def d_real_of(tapped):
                feats = list(feats_real)
                for layer, t in zip(layers, tapped):
                    feats[layer] = t
                out = apply(tuple(feats), r_real)
                return jnp.sum(out), out

            tapped = tuple(feats_real[layer] for layer in layers)
            grads, d_real = jax.grad(d_real_of, has_aux=True)(tapped)
            penalty = sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in grads) / d_real.shape[0]
            reg_loss = 0.5 * gan_config.r1_gamma * penalty
        else:
            d_real = apply(feats_real, r_real)
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
    """-> fn(DiscState, feats_real, r_real, feats_fake, r_fake, labels) -> (DiscState, metrics)."""
    loss_fn = disc_loss_fn(disc, gan_config)

    def update(state: DiscState, feats_real, r_real, feats_fake, r_fake, labels):
        feats_real = jax.lax.stop_gradient(feats_real)
        feats_fake = jax.lax.stop_gradient(feats_fake)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, feats_real, r_real, feats_fake, r_fake, labels, state.lecam_ema)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = gan_config.lecam_decay
        ema = decay * state.lecam_ema + (1 - decay) * jnp.stack([metrics["d_real"], metrics["d_fake"]])
        metrics = dict(metrics, disc_loss=loss)
        return DiscState(params, opt_state, ema), metrics

    return update
