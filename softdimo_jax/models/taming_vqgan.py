"""taming-transformers `VQModel` (Encoder, VectorQuantizer2, Decoder) as a Flax linen module.

Parameter-compatible with the PyTorch original (see `softdimo_jax.conversion.maskgit`):
GroupNorm(32, eps 1e-6), swish, residual blocks with a 1x1 `nin_shortcut` on the INPUT
when the width changes, single-head spatial self-attention blocks (1x1 q/k/v/proj_out,
scale C^-1/2) at the resolutions in `attn_resolutions`, downsampling by a stride-2 3x3 conv
after zero-padding right/bottom by one, nearest-neighbour upsampling then a 3x3 conv,
`quant_conv` / `post_quant_conv` 1x1 convs around the codebook (argmin of
|z|² + |e|² − 2 z·e).

Images at this API are NHWC float32 in [0, 1]; the original works in [−1, 1], so `encode`
maps x -> 2x − 1 and the decoders map y -> (y + 1) / 2 (not clipped: the original's
output is not clamped either).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_GN_GROUPS = 32
_GN_EPS = 1e-6

# taming's ImageNet f16-1024 VQGAN (MaskGIT's tokenizer): ddconfig + quantizer sizes.
IMAGENET_F16_1024_CFG = dict(
    ddconfig=dict(
        double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
        ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0,
    ),
    n_embed=1024,
    embed_dim=256,
)


def _swish(x):
    return x * jax.nn.sigmoid(x)


def _group_norm(name: str, groups: int = _GN_GROUPS) -> nn.GroupNorm:
    # float32 statistics with a two-pass variance, as torch computes them.
    return nn.GroupNorm(num_groups=groups, epsilon=_GN_EPS, dtype=jnp.float32,
                        use_fast_variance=False, name=name)


def _conv3(features: int, name: str, dtype, stride: int = 1, padding: Any = 1) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


def nearest_codes(z, codebook):
    """(B, h, w, C) latents -> ids (B, h, w) int32 of the nearest codebook rows (squared L2,
    float32, as torch's argmin over distances)."""
    e = codebook.astype(jnp.float32)
    z = z.astype(jnp.float32)
    d = (jnp.sum(z**2, axis=-1, keepdims=True) + jnp.sum(e**2, axis=-1)
         - 2.0 * jnp.einsum("bhwc,nc->bhwn", z, e, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def lookup_codes(codebook, indices):
    """(B, h, w) ids -> (B, h, w, C) codebook rows."""
    indices = jnp.asarray(indices)
    if indices.ndim != 3:
        raise ValueError(f"indices must be (B, h, w) token ids, got shape {indices.shape}")
    return jnp.take(codebook, indices.astype(jnp.int32), axis=0)


class ResnetBlock(nn.Module):
    out_channels: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    groups: int = _GN_GROUPS  # diffusers' ResnetBlock2D (aMUSEd/Meissonic VQ) takes it from its config

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = _swish(_group_norm("norm1", self.groups)(x)).astype(self.dtype)
        h = _conv3(self.out_channels, "conv1", self.dtype)(h)
        h = _swish(_group_norm("norm2", self.groups)(h)).astype(self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv3(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Dense(self.out_channels, dtype=self.dtype, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions (1x1 convs as Dense layers)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _group_norm("norm")(x).astype(self.dtype)
        q = nn.Dense(c, dtype=self.dtype, name="q")(h).reshape(b, hh * ww, c)
        k = nn.Dense(c, dtype=self.dtype, name="k")(h).reshape(b, hh * ww, c)
        v = nn.Dense(c, dtype=self.dtype, name="v")(h).reshape(b, hh * ww, c)
        w = jnp.einsum("bic,bjc->bij", q, k) * (int(c) ** (-0.5))
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(self.dtype)
        h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)
        return x + nn.Dense(c, dtype=self.dtype, name="proj_out")(h)


class Downsample(nn.Module):
    with_conv: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        # torch pads (left 0, right 1, top 0, bottom 1), then a VALID stride-2 conv.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv3(x.shape[-1], "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    with_conv: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest, x2
        return _conv3(x.shape[-1], "conv", self.dtype)(x) if self.with_conv else x


class Encoder(nn.Module):
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    double_z: bool = False
    dropout: float = 0.0
    resamp_with_conv: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = _conv3(self.ch, "conv_in", self.dtype)(x.astype(self.dtype))
        curr_res = self.resolution
        n_levels = len(self.ch_mult)
        for i in range(n_levels):
            for j in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * self.ch_mult[i], self.dropout, self.dtype,
                                name=f"down_{i}_block_{j}")(h, deterministic)
                if curr_res in self.attn_resolutions:
                    h = AttnBlock(self.dtype, name=f"down_{i}_attn_{j}")(h)
            if i != n_levels - 1:
                h = Downsample(self.resamp_with_conv, self.dtype, name=f"down_{i}_downsample")(h)
                curr_res //= 2
        h = ResnetBlock(h.shape[-1], self.dropout, self.dtype, name="mid_block_1")(h, deterministic)
        h = AttnBlock(self.dtype, name="mid_attn_1")(h)
        h = ResnetBlock(h.shape[-1], self.dropout, self.dtype, name="mid_block_2")(h, deterministic)
        h = _swish(_group_norm("norm_out")(h)).astype(self.dtype)
        z = 2 * self.z_channels if self.double_z else self.z_channels
        return _conv3(z, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
    ch: int
    out_ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    dropout: float = 0.0
    resamp_with_conv: bool = True
    tanh_out: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, deterministic: bool = True):
        n_levels = len(self.ch_mult)
        curr_res = self.resolution // 2 ** (n_levels - 1)
        block_in = self.ch * self.ch_mult[-1]
        h = _conv3(block_in, "conv_in", self.dtype)(z.astype(self.dtype))
        h = ResnetBlock(block_in, self.dropout, self.dtype, name="mid_block_1")(h, deterministic)
        h = AttnBlock(self.dtype, name="mid_attn_1")(h)
        h = ResnetBlock(block_in, self.dropout, self.dtype, name="mid_block_2")(h, deterministic)
        for i in reversed(range(n_levels)):
            for j in range(self.num_res_blocks + 1):
                h = ResnetBlock(self.ch * self.ch_mult[i], self.dropout, self.dtype,
                                name=f"up_{i}_block_{j}")(h, deterministic)
                if curr_res in self.attn_resolutions:
                    h = AttnBlock(self.dtype, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = Upsample(self.resamp_with_conv, self.dtype, name=f"up_{i}_upsample")(h)
                curr_res *= 2
        h = _swish(_group_norm("norm_out")(h)).astype(self.dtype)
        h = _conv3(self.out_ch, "conv_out", self.dtype)(h)
        return jnp.tanh(h) if self.tanh_out else h


class TamingVQModel(nn.Module):
    """taming `VQModel` with `VectorQuantizer2`; fields mirror its ddconfig, n_embed and
    embed_dim (defaults: the ImageNet f16-1024 model). Build from the original's config
    (`model.params` of model.yaml) with `taming_vqgan_from_cfg`."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.0
    in_channels: int = 3
    resolution: int = 256
    z_channels: int = 256
    double_z: bool = False
    n_embed: int = 1024
    embed_dim: int = 256
    resamp_with_conv: bool = True
    tanh_out: bool = False
    dtype: Any = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def setup(self):
        if self.double_z:
            # VQModel feeds the encoder output straight into a z_channels-wide quant_conv.
            raise ValueError("taming VQModel needs ddconfig.double_z = False")
        for width in {self.ch * m for m in self.ch_mult}:
            if width % _GN_GROUPS:
                raise ValueError(f"every block width must be divisible by {_GN_GROUPS} (GroupNorm); got {width}")
        common = dict(ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                      attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                      dropout=self.dropout, resamp_with_conv=self.resamp_with_conv, dtype=self.dtype)
        self.encoder = Encoder(self.ch, z_channels=self.z_channels, double_z=False, name="encoder", **common)
        self.decoder = Decoder(self.ch, self.out_ch, tanh_out=self.tanh_out, name="decoder", **common)
        self.quant_conv = nn.Dense(self.embed_dim, dtype=self.dtype, name="quant_conv")
        self.post_quant_conv = nn.Dense(self.z_channels, dtype=self.dtype, name="post_quant_conv")
        self.codebook_embedding = self.param(
            "codebook",
            # torch: embedding.weight.uniform_(-1/n_embed, 1/n_embed)
            lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1.0 / shape[0], 1.0 / shape[0]),
            (self.n_embed, self.embed_dim),
        )

    # --- codebook -----------------------------------------------------------------------
    def codebook(self):
        """(n_embed, embed_dim) codebook (VectorQuantizer2.embedding.weight)."""
        return self.codebook_embedding

    def quantize(self, h):
        """(B, h, w, embed_dim) -> nearest codebook ids (B, h, w) (argmin of squared L2)."""
        return nearest_codes(h, self.codebook())

    def lookup(self, indices):
        """(B, h, w) ids -> (B, h, w, embed_dim) codebook latents."""
        return lookup_codes(self.codebook(), indices)

    def soft_latents(self, probs):
        """(B, h, w, n_embed) probabilities -> expected latents probs @ codebook."""
        if probs.shape[-1] != self.n_embed:
            raise ValueError(f"probs must have n_embed={self.n_embed} entries on the last axis, got {probs.shape}")
        return jnp.einsum("bhwn,nc->bhwc", probs.astype(jnp.float32), self.codebook().astype(jnp.float32))

    # --- encode / decode ----------------------------------------------------------------
    def _check_images(self, images):
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(
                f"images must be NHWC with {self.in_channels} channels in [0, 1], got shape {images.shape}"
                + (" (NCHW? transpose to NHWC)" if images.ndim == 4 and images.shape[1] == self.in_channels else "")
            )
        f = self.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image height/width must be multiples of {f}, got {images.shape[1:3]}")

    def encode(self, images, deterministic: bool = True):
        """NHWC images in [0, 1] -> dict(h=(B, h, w, embed_dim) after quant_conv,
        indices=(B, h, w) int32, quantized=(B, h, w, embed_dim) codebook latents)."""
        self._check_images(images)
        x = images.astype(jnp.float32) * 2.0 - 1.0
        h = self.quant_conv(self.encoder(x, deterministic)).astype(jnp.float32)
        indices = self.quantize(h)
        return dict(h=h, indices=indices, quantized=self.lookup(indices))

    def decode_latents(self, latents, deterministic: bool = True):
        """(B, h, w, embed_dim) latents (codebook entries or soft probs @ codebook) ->
        NHWC images in [0, 1] (unclipped)."""
        if latents.ndim != 4 or latents.shape[-1] != self.embed_dim:
            raise ValueError(f"latents must be (B, h, w, {self.embed_dim}), got shape {latents.shape}")
        y = self.decoder(self.post_quant_conv(latents.astype(self.dtype)), deterministic)
        return (y.astype(jnp.float32) + 1.0) * 0.5

    def decode_tokens(self, indices, deterministic: bool = True):
        """(B, h, w) ids in [0, n_embed) -> NHWC images in [0, 1]."""
        return self.decode_latents(self.lookup(indices), deterministic)

    def decode_soft(self, probs, deterministic: bool = True):
        """(B, h, w, n_embed) probabilities -> images of the expected latents."""
        return self.decode_latents(self.soft_latents(probs), deterministic)

    def __call__(self, images, deterministic: bool = True):
        """Reconstruction through the hard codebook (also initialises every parameter)."""
        return self.decode_tokens(self.encode(images, deterministic)["indices"], deterministic)


def taming_vqgan_from_cfg(cfg: Mapping[str, Any], **overrides) -> TamingVQModel:
    """Builds the module from a taming VQModel config: either `model.params` of model.yaml
    ({ddconfig, n_embed, embed_dim, lossconfig, ...}) or the whole yaml tree ({model:
    {params: ...}}). Keyword overrides (dtype) win."""
    if "model" in cfg and "ddconfig" not in cfg:
        cfg = cfg["model"].get("params", cfg["model"])
    if "ddconfig" not in cfg:
        raise ValueError("taming VQModel config needs `ddconfig` (model.params of model.yaml)")
    dd = dict(cfg["ddconfig"])
    if bool(dd.get("double_z", True)):
        raise ValueError("taming VQModel needs ddconfig.double_z = False (VQ models set it explicitly)")
    if dd.get("in_channels", 3) != 3 or dd.get("out_ch", 3) != 3:
        raise ValueError("only RGB VQGANs (in_channels = out_ch = 3) are supported")
    if dd.get("give_pre_end", False):
        raise ValueError("ddconfig.give_pre_end returns decoder features, not images; unsupported")
    if cfg.get("remap") is not None:
        raise NotImplementedError("VectorQuantizer2 index remapping (remap=...) is not supported")
    kwargs = dict(
        ch=int(dd["ch"]),
        out_ch=int(dd["out_ch"]),
        ch_mult=tuple(int(m) for m in dd.get("ch_mult", (1, 2, 4, 8))),
        num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in dd["attn_resolutions"]),
        dropout=float(dd.get("dropout", 0.0)),
        in_channels=int(dd["in_channels"]),
        resolution=int(dd["resolution"]),
        z_channels=int(dd["z_channels"]),
        double_z=False,
        n_embed=int(cfg["n_embed"]),
        embed_dim=int(cfg["embed_dim"]),
        resamp_with_conv=bool(dd.get("resamp_with_conv", True)),
        tanh_out=bool(dd.get("tanh_out", False)),
    )
    kwargs.update(overrides)
    return TamingVQModel(**kwargs)


def vqgan_expected_params(model: TamingVQModel) -> Any:
    """Param shapes of `model` (jax.eval_shape; nothing is allocated)."""
    size = model.downsample_factor
    images = jnp.zeros((1, size, size, model.in_channels), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
    return variables["params"]
