"""MaskBit's lookup-free tokenizer (`ConvVQModel`, "VQGAN+") as a Flax linen module, NHWC.

Parameter-compatible with the PyTorch original (see `softdimo_jax.conversion.maskbit`).
Quirks kept on purpose (SPEC §2):
- convolutions use TF-style "same" padding computed from the input size (for the stride-2
  down-sampling conv on even sizes: nothing before, one row/column after);
- res-block convs have no bias; GroupNorm(32 groups, eps 1e-6) everywhere;
- in a residual block whose channel count changes, the 1x1 `nin_shortcut` is applied to
  the block's OUTPUT (not its input) and added to it;
- up-sampling is nearest-neighbour x2 followed by a 3x3 conv;
- the decoder output is NOT clamped (the original returns the raw conv output; images are
  [0, 1]-valued only approximately).
The quantiser is sign(z) -> ±1 bits (bit k of index i is (i >> k) & 1), with a
straight-through gradient; bits and indices follow `softdimo_jax.models.lfq`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from softdimo_jax.models import lfq

_GN_GROUPS = 32
_GN_EPS = 1e-6


def _group_norm(channels: int, name: str, dtype) -> nn.GroupNorm:
    if channels % _GN_GROUPS:
        raise ValueError(f"GroupNorm needs channels divisible by {_GN_GROUPS}, got {channels}")
    return nn.GroupNorm(
        num_groups=_GN_GROUPS, epsilon=_GN_EPS, dtype=dtype, use_fast_variance=False, name=name
    )


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Module):
    """Conv with MaskBit's `Conv2dSame` padding (explicit, from the static input size);
    params `kernel` (kh, kw, in, out) and optional `bias` sit directly under its name."""

    features: int
    kernel: int
    stride: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ph = _same_pad(x.shape[1], self.kernel, self.stride)
        pw = _same_pad(x.shape[2], self.kernel, self.stride)
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.kernel, self.kernel, x.shape[-1], self.features),
            jnp.float32,
        )
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=(ph, pw),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def _conv(features, kernel, name, dtype, stride=1, bias=True):
    return Conv2dSame(features, kernel, stride, bias, dtype, name=name)


class FoldedUpsampleConv(Conv2dSame):
    """3x3 `Conv2dSame` of the nearest-x2 up-sampled input, computed on the input itself
    (same parameters as `Conv2dSame(features, 3)`). Output pixel (2i+a, 2j+b) reads a 2x2
    window of x whose taps are sums of the 3x3 kernel's rows / columns: for phase 0 the
    rows x[i-1] (k0) and x[i] (k1+k2), for phase 1 x[i] (k0+k1) and x[i+1] (k2). Four 2x2
    convolutions over the small grid: 16 instead of 36 multiply-adds per output value and
    no up-sampled copy. Equal to repeat-then-conv up to float round-off (weights are
    summed before the product), hence opt-in (`ConvVQModel.fold_upsample`)."""

    @nn.compact
    def __call__(self, x):
        if self.kernel != 3 or self.stride != 1:
            raise ValueError("FoldedUpsampleConv is a 3x3, stride-1 convolution")
        k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features),
                       jnp.float32).astype(self.dtype)
        x = x.astype(self.dtype)
        fold = lambda w, axis: (jnp.stack([jnp.take(w, 0, axis), jnp.take(w, 1, axis) + jnp.take(w, 2, axis)], axis),
                                jnp.stack([jnp.take(w, 0, axis) + jnp.take(w, 1, axis), jnp.take(w, 2, axis)], axis))
        pads = ((1, 0), (0, 1))  # phase 0 reads one row before, phase 1 one row after
        rows = []
        for a, k_rows in enumerate(fold(k, 0)):
            cols = [jax.lax.conv_general_dilated(x, k_ab, (1, 1), (pads[a], pads[b]),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
                    for b, k_ab in enumerate(fold(k_rows, 1))]
            rows.append(jnp.stack(cols, axis=3))  # (B, h, w, 2, C)
        y = jnp.stack(rows, axis=2)  # (B, h, 2, w, 2, C)
        b, h, _, w, _, c = y.shape
        y = y.reshape(b, 2 * h, 2 * w, c)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class ResidualBlock(nn.Module):
    c_in: int
    c_out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        residual = x
        h = nn.silu(_group_norm(self.c_in, "norm1", self.dtype)(x))
        h = _conv(self.c_out, 3, "conv1", self.dtype, bias=False)(h)
        h = nn.silu(_group_norm(self.c_out, "norm2", self.dtype)(h))
        h = _conv(self.c_out, 3, "conv2", self.dtype, bias=False)(h)
        if self.c_in != self.c_out:
            # MaskBit quirk: the shortcut projects the block's output, not its input.
            residual = _conv(self.c_out, 1, "nin_shortcut", self.dtype, bias=False)(h)
        return h + residual


class Stage(nn.Module):
    """`num_blocks` residual blocks, then optional down- (stride-2 conv or 2x2 average pool)
    or up-sampling (nearest x2 then 3x3 conv)."""

    c_in: int
    c_out: int
    num_blocks: int
    resample: str | None = None  # None | "down_conv" | "avg_pool" | "up"
    dtype: Any = jnp.float32
    fold_upsample: bool = False  # "up": FoldedUpsampleConv instead of repeat + 3x3 conv

    @nn.compact
    def __call__(self, x):
        c = self.c_in
        for j in range(self.num_blocks):
            x = ResidualBlock(c, self.c_out, self.dtype, name=f"res_blocks_{j}")(x)
            c = self.c_out
        if self.resample == "down_conv":
            x = _conv(c, 3, "down_conv", self.dtype, stride=2)(x)
        elif self.resample == "avg_pool":
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        elif self.resample == "up" and self.fold_upsample:
            x = FoldedUpsampleConv(self.c_out, 3, dtype=self.dtype, name="upsample_conv")(x)
        elif self.resample == "up":
            # Nearest x2 via repeat (a broadcast+reshape has no resolvable sharding on
            # Explicit-axes meshes with a sharded batch).
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _conv(self.c_out, 3, "upsample_conv", self.dtype)(x)
        return x


class ConvEncoder(nn.Module):
    plan: Mapping[str, Any]
    hidden_channels: int
    num_bits: int
    num_res_blocks: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        x = _conv(self.hidden_channels, 3, "conv_in", self.dtype, bias=False)(images)
        for i, (c_in, c_out, resample) in enumerate(self.plan["stages"]):
            x = Stage(c_in, c_out, self.num_res_blocks, resample, self.dtype, name=f"down_{i}")(x)
        mid = self.plan["mid"]
        x = Stage(mid, mid, self.num_res_blocks, None, self.dtype, name="mid")(x)
        x = nn.silu(_group_norm(mid, "norm_out", self.dtype)(x))
        return _conv(self.num_bits, 1, "conv_out", self.dtype)(x)


class ConvDecoder(nn.Module):
    plan: Mapping[str, Any]
    num_channels: int
    num_res_blocks: int
    dtype: Any = jnp.float32
    fold_upsample: bool = False

    @nn.compact
    def __call__(self, bits):
        block_in = self.plan["block_in"]
        x = _conv(block_in, 3, "conv_in", self.dtype)(bits)
        x = Stage(block_in, block_in, self.num_res_blocks, None, self.dtype, name="mid")(x)
        for i, (c_in, c_out, resample) in enumerate(self.plan["stages"]):
            x = Stage(c_in, c_out, self.num_res_blocks, resample, self.dtype, self.fold_upsample,
                      name=f"up_{i}")(x)
        c_last = self.plan["stages"][-1][1]
        x = nn.silu(_group_norm(c_last, "norm_out", self.dtype)(x))
        return _conv(self.num_channels, 3, "conv_out", self.dtype)(x)


class ConvVQModel(nn.Module):
    """Conv encoder -> lookup-free quantiser -> conv decoder. Images NHWC in [0, 1]."""

    num_bits: int
    hidden_channels: int = 128
    channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    num_channels: int = 3
    num_resolutions: int | None = None  # default len(channel_mult)
    num_res_blocks_decoder: int | None = None  # default num_res_blocks
    sample_with_conv: bool = True
    dtype: Any = jnp.float32
    # Decoder up-sampling as FoldedUpsampleConv (2.25x fewer FLOPs in those convs, ~26% of
    # the 14-bit decoder's; same params, float round-off apart). Off by default (training,
    # parity, the digits job); the sampling API turns it on for MaskBit's decode.
    fold_upsample: bool = False

    @property
    def levels(self) -> int:
        return len(self.channel_mult) if self.num_resolutions is None else int(self.num_resolutions)

    @property
    def decoder_res_blocks(self) -> int:
        return self.num_res_blocks if self.num_res_blocks_decoder is None else self.num_res_blocks_decoder

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.levels - 1)

    @property
    def codebook_size(self) -> int:
        return 2**self.num_bits

    def stage_plan(self):
        """(encoder plan, decoder plan): channel counts per stage, as the original computes them."""
        h, mult, n = self.hidden_channels, tuple(self.channel_mult), self.levels
        enc_mult = (1,) + mult
        enc_stages = []
        for i in range(n):
            resample = None
            if i < n - 1:
                resample = "down_conv" if self.sample_with_conv else "avg_pool"
            enc_stages.append((h * enc_mult[i], h * enc_mult[i + 1], resample))
        dec_mult = mult + (mult[-1],)
        dec_stages = [
            (h * dec_mult[i + 1], h * dec_mult[i], "up" if i > 0 else None) for i in reversed(range(n))
        ]
        enc = {"stages": tuple(enc_stages), "mid": enc_stages[-1][1]}
        dec = {"stages": tuple(dec_stages), "block_in": h * mult[n - 1]}
        return enc, dec

    def setup(self):
        enc_plan, dec_plan = self.stage_plan()
        self.encoder = ConvEncoder(enc_plan, self.hidden_channels, self.num_bits, self.num_res_blocks, self.dtype)
        self.decoder = ConvDecoder(dec_plan, self.num_channels, self.decoder_res_blocks, self.dtype,
                                   self.fold_upsample)

    def encode(self, images):
        """(B, H, W, C) in [0, 1] -> dict(z (pre-quantisation), bits (±1, straight-through
        gradient to z), indices (B, h, w) int32)."""
        if images.ndim != 4 or images.shape[-1] != self.num_channels:
            raise ValueError(
                f"images must be NHWC with {self.num_channels} channels, got shape {images.shape}"
                " (convert NCHW with x.transpose(0, 2, 3, 1))"
            )
        f = self.downsample_factor
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image height/width {images.shape[1:3]} must be multiples of {f}")
        z = self.encoder(images).astype(jnp.float32)
        hard = jnp.where(z > 0, 1.0, -1.0).astype(z.dtype)
        bits = z + jax.lax.stop_gradient(hard - z)
        return {"z": z, "bits": bits, "indices": lfq.bits_to_indices(hard)}

    def decode_bits(self, bits):
        """(B, h, w, bits) real (±1 or soft in [−1, 1]) -> images (B, H, W, C), unclamped."""
        if bits.shape[-1] != self.num_bits:
            raise ValueError(f"bits has {bits.shape[-1]} channels, the tokenizer expects {self.num_bits}")
        return self.decoder(bits.astype(self.dtype)).astype(jnp.float32)

    def decode_tokens(self, indices):
        """(B, h, w) token ids in [0, 2**bits) -> images."""
        if indices.ndim != 3:
            raise ValueError(f"indices must be (B, h, w), got shape {indices.shape}")
        return self.decode_bits(lfq.indices_to_bits(indices, self.num_bits, jnp.float32))

    def __call__(self, images):
        enc = self.encode(images)
        return self.decode_bits(enc["bits"]), enc


def lfq_losses(z, commitment_cost: float, entropy_weight: float, temperature: float, gamma: float = 1.0):
    """MaskBit's LFQ training losses on pre-quantisation latents z (..., bits).

    commitment = cost · mean((sg(sign(z)) − z)²); entropy over the implicit ±1 codebook
    with affinity 2·z·c / temperature: per-sample entropy minus gamma · entropy of the
    batch-average distribution (logs clamped at 1e-5, as the original). The full 2**bits
    softmax is materialised (B·h·w × 2**bits floats), as in the original.
    """
    z = z.astype(jnp.float32)
    bits = z.shape[-1]
    hard = jnp.where(z > 0, 1.0, -1.0)
    commitment = commitment_cost * jnp.mean((jax.lax.stop_gradient(hard) - z) ** 2)
    codebook = lfq.indices_to_bits(jnp.arange(2**bits), bits, jnp.float32)
    affinity = 2.0 * jnp.einsum("...c,nc->...n", z, codebook).reshape(-1, 2**bits) / temperature
    probs = jax.nn.softmax(affinity, axis=-1)
    clamp_log = lambda p: jnp.log(jnp.maximum(p, 1e-5))
    per_sample = -jnp.mean(jnp.sum(probs * clamp_log(probs), axis=-1))
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = gamma * -jnp.sum(avg_probs * clamp_log(avg_probs))
    entropy = entropy_weight * (per_sample - avg_entropy)
    return {
        "quantizer_loss": commitment + entropy,
        "commitment_loss": commitment,
        "entropy_loss": entropy,
        "per_sample_entropy": per_sample,
        "avg_entropy": avg_entropy,
    }


def _cfg_get(cfg, key, default=None):
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def maskbit_tokenizer_from_cfg(cfg: Mapping[str, Any], **overrides) -> ConvVQModel:
    """Builds a ConvVQModel from MaskBit's `model.vq_model` config (token_size, hidden_channels,
    channel_mult, num_resolutions, num_res_blocks, num_channels, sample_with_conv, ...)."""
    qtype = _cfg_get(cfg, "quantizer_type", "lookup-free")
    if qtype != "lookup-free":
        raise ValueError(f"only the lookup-free MaskBit tokenizer is ported, got quantizer_type={qtype!r}")
    bits = _cfg_get(cfg, "token_size")
    if bits is None:
        bits = int(round(math.log2(int(_cfg_get(cfg, "codebook_size")))))
    mult = tuple(int(m) for m in _cfg_get(cfg, "channel_mult", (1, 1, 2, 2, 4)))
    nrd = _cfg_get(cfg, "num_res_blocks_decoder")
    kwargs = dict(
        num_bits=int(bits),
        hidden_channels=int(_cfg_get(cfg, "hidden_channels", 128)),
        channel_mult=mult,
        num_res_blocks=int(_cfg_get(cfg, "num_res_blocks", 2)),
        num_channels=int(_cfg_get(cfg, "num_channels", 3)),
        num_resolutions=int(_cfg_get(cfg, "num_resolutions", len(mult))),
        num_res_blocks_decoder=None if nrd is None else int(nrd),
        sample_with_conv=bool(_cfg_get(cfg, "sample_with_conv", True)),
    )
    kwargs.update(overrides)
    return ConvVQModel(**kwargs)


def maskbit_tokenizer_from_config(config, **overrides) -> ConvVQModel:
    """Builds a ConvVQModel from a `configs/maskbit.py` tokenizer ConfigDict (our field names)."""
    fields = ("num_bits", "hidden_channels", "num_res_blocks", "num_channels", "num_resolutions",
              "num_res_blocks_decoder", "sample_with_conv")
    kwargs = {f: _cfg_get(config, f) for f in fields if _cfg_get(config, f) is not None}
    if _cfg_get(config, "channel_mult") is not None:
        kwargs["channel_mult"] = tuple(int(m) for m in _cfg_get(config, "channel_mult"))
    if _cfg_get(config, "dtype") is not None:
        kwargs["dtype"] = jnp.dtype(_cfg_get(config, "dtype"))
    kwargs.update(overrides)
    return ConvVQModel(**kwargs)
