"""The TF-derived FID Inception-v3 (pytorch-fid / torch-fidelity weights) in Flax linen.

This is the network behind every published FID / IS number: the 2015-12-05 TensorFlow
graph, not torchvision's Inception-v3. Its differences from torchvision's network, which a
port must keep: the 3×3 average pools inside the A, C and first E blocks ignore the
zero padding (TF's `count_include_pad=False`), the last E block (Mixed_7c) pools its
fourth branch with a *max* pool, the classifier has 1008 outputs, BatchNorm eps is 1e-3,
and the input is resized with TF1's bilinear kernel (align_corners=False: source
coordinate = destination · in/out, no half-pixel offset) and normalised as (x − 128)/128.

Input: uint8 NHWC images of any size. Outputs (a dict) the torch-fidelity feature names:
`64`, `192`, `768` (spatial means of intermediate maps), `2048` (the FID pool features) and
`logits_unbiased` (pool @ fc.weightᵀ, no bias: what IS uses), plus `logits` with the bias.

Parameters mirror the PyTorch names (`Mixed_5b/branch1x1/conv/kernel`, `.../bn/{scale,bias,
mean,var}`), so conversion is a rename plus layout change (see conversion/inception.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURES = ("64", "192", "768", "2048", "logits_unbiased", "logits")
INPUT_SIZE = 299
NUM_CLASSES = 1008
BN_EPS = 1e-3


def _tf1_axis(n_in: int, n_out: int):
    """Gather indices and weights of TF1 bilinear resize along one axis (align_corners=False).

    Computed in float32 exactly as torch-fidelity's port does (coordinate = i · float32(in/out),
    truncated), so the resized pixels match it bit for bit before rounding of the lerp.
    """
    scale = np.float32(n_in / n_out)
    coord = np.arange(n_out, dtype=np.float32) * scale
    lo = coord.astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (coord - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, frac


def resize_bilinear_tf1(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TF1 `resize_bilinear(align_corners=False)` of float NHWC images to `size` (h, w)."""
    n_h, n_w = size
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (n_h, n_w):
        return x  # scale 1: identity
    ylo, yhi, dy = _tf1_axis(in_h, n_h)
    xlo, xhi, dx = _tf1_axis(in_w, n_w)
    dx = jnp.asarray(dx)[None, None, :, None]
    dy = jnp.asarray(dy)[None, :, None, None]
    rows_lo = jnp.take(x, ylo, axis=1)
    rows_hi = jnp.take(x, yhi, axis=1)
    # Same lerp order as the reference: along x first, then y.
    top = rows_lo[:, :, xlo] + (rows_lo[:, :, xhi] - rows_lo[:, :, xlo]) * dx
    bot = rows_hi[:, :, xlo] + (rows_hi[:, :, xhi] - rows_hi[:, :, xlo]) * dx
    return top + (bot - top) * dy


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference form; running statistics are ordinary (frozen) params."""

    features: int
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x):
        c = self.features
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
    """Conv (no bias) → BatchNorm(eps 1e-3) → ReLU, PyTorch-style explicit padding."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        return nn.relu(FrozenBatchNorm(self.features, name="bn")(x))


def _avg_pool_same(x):
    # TF's average pool divides by the number of real (unpadded) pixels.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride: int = 2, pad: int = 0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        C = lambda f, k=(1, 1), p=(0, 0), name=None: BasicConv(f, k, 1, p, self.precision, name=name)
        b1 = C(64, name="branch1x1")(x)
        b5 = C(48, name="branch5x5_1")(x)
        b5 = C(64, (5, 5), (2, 2), name="branch5x5_2")(b5)
        b3 = C(64, name="branch3x3dbl_1")(x)
        b3 = C(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
        b3 = C(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
        bp = C(self.pool_features, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        P = self.precision
        b3 = BasicConv(384, (3, 3), 2, precision=P, name="branch3x3")(x)
        bd = BasicConv(64, precision=P, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), 1, (1, 1), P, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), 2, precision=P, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c7, P = self.channels_7x7, self.precision
        row = lambda f, name: BasicConv(f, (1, 7), 1, (0, 3), P, name=name)
        col = lambda f, name: BasicConv(f, (7, 1), 1, (3, 0), P, name=name)
        b1 = BasicConv(192, precision=P, name="branch1x1")(x)
        b7 = BasicConv(c7, precision=P, name="branch7x7_1")(x)
        b7 = col(192, "branch7x7_3")(row(c7, "branch7x7_2")(b7))
        bd = BasicConv(c7, precision=P, name="branch7x7dbl_1")(x)
        bd = col(c7, "branch7x7dbl_2")(bd)
        bd = row(c7, "branch7x7dbl_3")(bd)
        bd = col(c7, "branch7x7dbl_4")(bd)
        bd = row(192, "branch7x7dbl_5")(bd)
        bp = BasicConv(192, precision=P, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        P = self.precision
        b3 = BasicConv(192, precision=P, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), 2, precision=P, name="branch3x3_2")(b3)
        b7 = BasicConv(192, precision=P, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), 1, (0, 3), P, name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), 1, (3, 0), P, name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), 2, precision=P, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    """`max_pool_branch`: the TF graph's Mixed_7c pools with max instead of average."""

    max_pool_branch: bool = False
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        P = self.precision
        C = lambda f, k=(1, 1), p=(0, 0), name=None: BasicConv(f, k, 1, p, P, name=name)
        b1 = C(320, name="branch1x1")(x)
        b3 = C(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [C(384, (1, 3), (0, 1), name="branch3x3_2a")(b3), C(384, (3, 1), (1, 0), name="branch3x3_2b")(b3)],
            axis=-1,
        )
        bd = C(448, name="branch3x3dbl_1")(x)
        bd = C(384, (3, 3), (1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [C(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(bd), C(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(bd)],
            axis=-1,
        )
        pooled = _max_pool(x, stride=1, pad=1) if self.max_pool_branch else _avg_pool_same(x)
        bp = C(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
    """The 1008-way fc layer; returns (logits without bias, logits). IS uses the former."""

    num_classes: int
    precision: Any = None

    @nn.compact
    def __call__(self, pool):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], self.num_classes))
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
        unbiased = jnp.dot(pool, kernel, precision=self.precision)
        return unbiased, unbiased + bias


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3. `__call__(images_uint8_nhwc)` → dict of the requested features.

    Attributes:
      input_size: side the images are resized to (299 for the published network).
      num_classes: classifier width (1008 in the TF graph).
      features: names to return, a subset of FEATURES; computation stops at the last one.
      precision: matmul/conv precision (None = JAX default; "highest" forces full float32
        on TPU/GPU, where the default may use bf16/TF32 passes).
    """

    input_size: int = INPUT_SIZE
    num_classes: int = NUM_CLASSES
    features: Sequence[str] = ("2048", "logits_unbiased")
    precision: Any = None

    @nn.compact
    def __call__(self, images: jax.Array, *, preprocessed: bool = False) -> dict[str, jax.Array]:
        """uint8 NHWC images of any size → {feature name: (B, D) float32}.

        With `preprocessed=True`, `images` are the float (B, S, S, 3) output of
        `preprocess` (lets callers jit the resize apart from the network, which then
        compiles once for every input size).
        """
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features:
            raise ValueError(f"unknown Inception features {unknown}; choose from {FEATURES}")
        if preprocessed:
            want = (self.input_size, self.input_size, 3)
            if images.ndim != 4 or tuple(images.shape[1:]) != want:
                raise ValueError(f"preprocessed input must be (B, {want[0]}, {want[1]}, 3), got {tuple(images.shape)}")
            x = images.astype(jnp.float32)
        else:
            x = self.preprocess(images)
        P = self.precision
        wanted = set(self.features)
        out: dict[str, jax.Array] = {}
        done = lambda: wanted <= set(out)
        spatial_mean = lambda h: jnp.mean(h, axis=(1, 2))

        x = BasicConv(32, (3, 3), 2, precision=P, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), precision=P, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), 1, (1, 1), P, name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        out["64"] = spatial_mean(x)
        if done() and not self.is_initializing():
            return self._select(out)
        x = BasicConv(80, precision=P, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), precision=P, name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        out["192"] = spatial_mean(x)
        if done() and not self.is_initializing():
            return self._select(out)
        x = InceptionA(32, P, name="Mixed_5b")(x)
        x = InceptionA(64, P, name="Mixed_5c")(x)
        x = InceptionA(64, P, name="Mixed_5d")(x)
        x = InceptionB(P, name="Mixed_6a")(x)
        x = InceptionC(128, P, name="Mixed_6b")(x)
        x = InceptionC(160, P, name="Mixed_6c")(x)
        x = InceptionC(160, P, name="Mixed_6d")(x)
        x = InceptionC(192, P, name="Mixed_6e")(x)
        out["768"] = spatial_mean(x)
        if done() and not self.is_initializing():
            return self._select(out)
        x = InceptionD(P, name="Mixed_7a")(x)
        x = InceptionE(False, P, name="Mixed_7b")(x)
        x = InceptionE(True, P, name="Mixed_7c")(x)
        pool = spatial_mean(x)
        out["2048"] = pool
        out["logits_unbiased"], out["logits"] = Classifier(self.num_classes, P, name="fc")(pool)
        return self._select(out)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """uint8 NHWC of any size → float32 (B, S, S, 3) in [−1, 1] (TF1 resize, (x−128)/128)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"Inception expects NHWC RGB images (B, H, W, 3); got shape {tuple(images.shape)}"
                " (transpose NCHW arrays with x.transpose(0, 2, 3, 1))"
            )
        if images.dtype != jnp.uint8:
            raise TypeError(
                f"Inception expects uint8 images in [0, 255], got {images.dtype}; convert float "
                "images in [0, 1] with softdimo_jax.evaluation.fid.to_uint8"
            )
        x = resize_bilinear_tf1(images.astype(jnp.float32), (self.input_size, self.input_size))
        return (x - 128.0) / 128.0

    def _select(self, out):
        return {k: out[k] for k in self.features}
