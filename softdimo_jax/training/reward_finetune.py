"""Reward fine-tuning of the one-step generator through soft embeddings (SPEC §1.4).

    L = w_dimo · L_DiMO − w · Σ_i λ_i R_i(Dec(ẽ_Dec), c)

ẽ_Dec are the decoder-side soft embeddings (for MaskBit: expected ±1 bits under
softmax(z_θ/τ), reshaped to the token grid), Dec the FROZEN tokenizer decoder, R_i the
registered differentiable rewards (training/rewards.py) with their FROZEN weights. The
reward gradient reaches z_θ through the decoder and joins Di[M]O's cotangent g/B in the
same generator backward (gan.RefineDistiller); the auxiliary update and EMA keep running.
The reward term is a batch mean, like the GAN term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softdimo_jax.training import gan


def soft_decode_images(tokenizer, tokenizer_params, embedder, z, grid, rng=None):
    """(B, L, S, V) generator logits -> decoded soft images (B, H, W, C), unclamped."""
    bits = embedder.decoder_bits(z, grid, rng)
    return tokenizer.apply({"params": tokenizer_params}, bits, method=type(tokenizer).decode_bits)


class RewardRefiner:
    """The reward phase. `step(state, rng, frozen)` with frozen = {"teacher", "tokenizer",
    "reward"} (reward = `reward_set.params`) -> (DistillState, metrics)."""

    def __init__(self, adapter, distill_config, reward_config, tokenizer, reward_set, grid, mesh=None):
        from softdimo_jax.models.soft_embed import SoftEmbedder

        self.adapter = adapter
        self.config = reward_config
        self.tokenizer = tokenizer
        self.reward_set = reward_set
        self.grid = tuple(grid)
        self.distiller = gan.make_refine_distiller(adapter, distill_config, reward_config, mesh)
        self.mesh = self.distiller.mesh
        self.embedder = SoftEmbedder(mode=str(reward_config.soft_mode), tau=float(reward_config.soft_tau))

    def init_state(self, dimo_state):
        return self.distiller.init_from(dimo_state)

    def reward_loss(self, tokenizer_params, reward_params, z, labels, rng):
        images = soft_decode_images(self.tokenizer, tokenizer_params, self.embedder, z, self.grid, rng)
        total, parts = self.reward_set.total(reward_params, images, labels)
        stats = {"reward": jnp.mean(total)}
        stats.update({f"reward_{k}": jnp.mean(v) for k, v in parts.items()})
        return -float(self.config.w) * jnp.mean(total), (stats, None)

    def step(self, state, rng, frozen):
        extra = lambda z, labels, k: self.reward_loss(frozen["tokenizer"], frozen["reward"], z, labels, k)
        new_state, metrics, _ = self.distiller.run_with_extra(extra, state, frozen["teacher"], rng)
        metrics = dict(metrics, loss=metrics["gen_loss"])
        return new_state, metrics

    def trainer_step_fn(self):
        """`step_fn(state, batch, rng, step, frozen)` for training.trainer.Trainer (data-free)."""
        return lambda state, batch, rng, step, frozen: self.step(state, rng, frozen)
