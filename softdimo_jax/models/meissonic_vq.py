"""Meissonic's VQ model (diffusers `VQModel` in aMUSEd's layout) as a Flax linen module.

Parameter-compatible with diffusers' state dict (see `softdimo_jax.conversion.meissonic`).
The network is the taming VQGAN's without attention: the GroupNorm + SiLU residual blocks
(1x1 shortcut on the input when the width changes), the stride-2 down-sampling after
zero-padding bottom/right and the nearest x2 + 3x3 conv up-sampling are the same modules
(`taming_vqgan.ResnetBlock/Downsample/Upsample`), with the group count from the config.
Differences to taming: widths come from `block_out_channels` directly, the last encoder
level does not down-sample, the mid blocks are two residual blocks without attention, and
images are used in [0, 1] as they are (no [-1, 1] mapping; outputs are not clipped).

Quantisation: the nearest codebook row by Euclidean distance, no normalisation. Decoding
ids is the pipeline's `decode(ids, force_not_quantize=True)` (a codebook lookup); the soft
path decodes p @ codebook.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from softdimo_jax.models.taming_vqgan import Downsample, ResnetBlock, Upsample, lookup_codes, nearest_codes

_GN_EPS = 1e-6


def _norm_out(groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=_GN_EPS, dtype=jnp.float32, use_fast_variance=False,
                        name="conv_norm_out")


class AmusedEncoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        chans = tuple(self.block_out_channels)
        h = nn.Conv(chans[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        for i, c in enumerate(chans):
            for j in range(self.layers_per_block):
                h = ResnetBlock(c, 0.0, self.dtype, self.groups, name=f"down_blocks_{i}_resnets_{j}")(h)
            if i != len(chans) - 1:
                h = Downsample(True, self.dtype, name=f"down_blocks_{i}_downsamplers_0")(h)
        for j in range(2):
            h = ResnetBlock(chans[-1], 0.0, self.dtype, self.groups, name=f"mid_block_resnets_{j}")(h)
        h = nn.silu(_norm_out(self.groups)(h)).astype(self.dtype)
        return nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(h)


class AmusedDecoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        chans = tuple(reversed(self.block_out_channels))
        h = nn.Conv(chans[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
        for j in range(2):
            h = ResnetBlock(chans[0], 0.0, self.dtype, self.groups, name=f"mid_block_resnets_{j}")(h)
        for i, c in enumerate(chans):
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(c, 0.0, self.dtype, self.groups, name=f"up_blocks_{i}_resnets_{j}")(h)
            if i != len(chans) - 1:
                h = Upsample(True, self.dtype, name=f"up_blocks_{i}_upsamplers_0")(h)
        h = nn.silu(_norm_out(self.groups)(h)).astype(self.dtype)
        return nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(h)


class MeissonicVQModel(nn.Module):
    """diffusers VQModel (norm_type 'group', no mid-block attention, lookup_from_codebook).

    Fields carry the names of the diffusers config.json (defaults: Meissonic's vqvae, f16,
    8192 codes of 64 channels). Images are NHWC in [0, 1]; latents (B, h, w, C).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 256, 512, 768)
    layers_per_block: int = 2
    latent_channels: int = 64
    norm_num_groups: int = 32
    num_vq_embeddings: int = 8192
    vq_embed_dim: Optional[int] = None
    dtype: Any = jnp.float32

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim or self.latent_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block width {c} is not divisible by norm_num_groups {self.norm_num_groups}")
        kw = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                  groups=self.norm_num_groups, dtype=self.dtype)
        self.encoder = AmusedEncoder(out_channels=self.latent_channels, name="encoder", **kw)
        self.decoder = AmusedDecoder(out_channels=self.out_channels, name="decoder", **kw)
        # 1x1 convs as Dense layers over the channel axis.
        self.quant_conv = nn.Dense(self.embed_dim, dtype=self.dtype, name="quant_conv")
        self.post_quant_conv = nn.Dense(self.latent_channels, dtype=self.dtype, name="post_quant_conv")
        self.codebook_embedding = self.param("codebook", nn.initializers.uniform(1.0 / self.num_vq_embeddings),
                                             (self.num_vq_embeddings, self.embed_dim))

    def codebook(self):
        return self.codebook_embedding

    def quantize(self, latents):
        """(B, h, w, C) -> nearest codebook ids (B, h, w) int32 (torch.cdist + argmin)."""
        return nearest_codes(latents, self.codebook())

    def lookup(self, indices):
        return lookup_codes(self.codebook(), indices)

    def soft_latents(self, probs):
        """(B, h, w, K) probabilities over the codes -> p @ codebook (B, h, w, C)."""
        if probs.shape[-1] != self.num_vq_embeddings:
            raise ValueError(f"probs must have {self.num_vq_embeddings} entries on the last axis, got {probs.shape}")
        return jnp.einsum("bhwn,nc->bhwc", probs.astype(jnp.float32), self.codebook().astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)

    def encode(self, images):
        """NHWC images in [0, 1] -> dict(latents (after quant_conv), indices, quantized)."""
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(f"images must be NHWC with {self.in_channels} channels in [0, 1], got {images.shape}")
        f = self.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image height/width must be multiples of {f}, got {images.shape[1:3]}")
        latents = self.quant_conv(self.encoder(images)).astype(jnp.float32)
        indices = self.quantize(latents)
        return dict(latents=latents, indices=indices, quantized=self.lookup(indices))

    def decode_latents(self, latents):
        """(B, h, w, C) codebook-space latents -> NHWC images (unclipped; the pipeline clips to [0, 1])."""
        if latents.ndim != 4 or latents.shape[-1] != self.embed_dim:
            raise ValueError(f"latents must be (B, h, w, {self.embed_dim}), got shape {latents.shape}")
        return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)

    def decode_tokens(self, indices):
        return self.decode_latents(self.lookup(indices))

    def decode_soft(self, probs):
        return self.decode_latents(self.soft_latents(probs))

    def __call__(self, images):
        """VQModel.forward: encode -> quantise -> decode (also initialises every parameter)."""
        return self.decode_tokens(self.encode(images)["indices"])


def vq_expected_params(model: MeissonicVQModel) -> Any:
    """Param shapes of `model` (jax.eval_shape; nothing is allocated)."""
    f = model.downsample_factor
    images = jnp.zeros((1, f, f, model.in_channels), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))["params"]
