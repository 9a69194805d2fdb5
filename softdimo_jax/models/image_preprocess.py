"""Differentiable CLIP-style image preprocessing in JAX (the reward models' input path).

images in [0, 1], NHWC (B, H, W, 3), any size → resize so the shorter side is S → centre
crop S×S → (x − mean) / std. This is the float tensor path of the originals (torchvision's
`Resize(S, BICUBIC, antialias=True)` = `F.interpolate(mode='bicubic', align_corners=False,
antialias=True)`), so decoder output goes straight in with no uint8 rounding.

Facts the originals fix:
- output size: the shorter side becomes S, the longer `int(S · long / short)` (truncation);
- the antialiased bicubic is PIL's separable filter with a = −0.5 (not plain bicubic's
  −0.75): per output pixel i, centre c = scale·(i + 0.5) with scale = in/out, support
  2·max(scale, 1), taps j in [int(c − support + 0.5), int(c + support + 0.5)) clipped to the
  image, weight k((j − c + 0.5) / max(scale, 1)), normalised to sum 1. Upsampling uses the
  same formula with scale < 1 (support 2, no stretch);
- crop anchor: torchvision (OpenCLIP, HPS v2, ImageReward) `int(round((h − S) / 2))` with
  Python's half-to-even rounding; transformers' CLIPImageProcessor (PickScore) floors,
  `(h − S) // 2` — `crop="torchvision"` or `crop="floor"`.

The resize is a pair of small constant matrices (built in numpy from static shapes) applied
with einsum: exact, differentiable, and cheap next to any CLIP tower.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_RULES = ("torchvision", "floor")


def _cubic_aa(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 weights of PyTorch's antialiased bicubic along one axis
    (align_corners=False, output size given, so scale = in / out)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = _cubic_aa((j - center + 0.5) / stretch)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0.0 else w
    return m


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(size) with an int: shorter side → size, longer int(size·long/short)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def crop_offset(length: int, size: int, rule: str) -> int:
    if rule == "torchvision":
        return int(round((length - size) / 2.0))  # Python round: half to even
    if rule == "floor":
        return (length - size) // 2
    raise ValueError(f"unknown crop rule {rule!r}; expected one of {CROP_RULES}")


def preprocess_matrices(h: int, w: int, size: int, crop: str = "torchvision") -> tuple[np.ndarray, np.ndarray]:
    """Resize + centre crop as two float32 matrices: rows (size, h) and columns (size, w)."""
    rh, rw = resized_shape(h, w, size)
    if rh < size or rw < size:
        raise ValueError(f"resize of {h}x{w} to shorter side {size} gave {rh}x{rw}, smaller than the crop")
    top, left = crop_offset(rh, size, crop), crop_offset(rw, size, crop)
    # torchvision skips the resize when the image already has the target size.
    mh = np.eye(h) if rh == h else resize_matrix(h, rh)
    mw = np.eye(w) if rw == w else resize_matrix(w, rw)
    return mh[top : top + size].astype(np.float32), mw[left : left + size].astype(np.float32)


def clip_preprocess(
    images,
    size: int,
    *,
    crop: str = "torchvision",
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
):
    """(B, H, W, C) float images in [0, 1] → (B, size, size, C) float32, normalised.

    Differentiable in the images (gradients flow straight back to a decoder's output)."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != len(mean):
        raise ValueError(
            f"images must be NHWC (B, H, W, {len(mean)}) in [0, 1], got shape {tuple(images.shape)}"
            " (transpose NCHW arrays with x.transpose(0, 2, 3, 1))"
        )
    _, h, w, _ = images.shape
    mh, mw = preprocess_matrices(int(h), int(w), int(size), crop)
    x = images.astype(jnp.float32)
    # HIGHEST: full float32 matmuls, so the result matches the reference on any backend.
    x = jnp.einsum("ih,bhwc->biwc", jnp.asarray(mh), x, precision="highest")
    x = jnp.einsum("jw,biwc->bijc", jnp.asarray(mw), x, precision="highest")
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (x - mean) / std
