"""Image grids written as PNG (shared by every sampling stage)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def make_image_grid(images, nrow: int | None = None, padding: int = 2, pad_value: float = 0.0) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] -> (rows·(H+p)+p, nrow·(W+p)+p, C) uint8 grid, row-major.

    nrow is the number of images per row (default ceil(sqrt(N))); values are clipped to
    [0, 1] and rounded to 8 bits.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images must be NHWC with 1, 3 or 4 channels, got shape {images.shape}; "
            "add a batch axis with images[None] or move channels last"
        )
    if not np.all(np.isfinite(images)):
        raise ValueError("images contain NaN or inf; the decoder or sampler produced invalid values")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    nrow = min(nrow, n)
    rows = math.ceil(n / nrow)
    pixels = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    pad = int(round(np.clip(pad_value, 0.0, 1.0) * 255.0))
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad, np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = pixels[k]
    return grid


def save_image_grid(images, path, nrow: int | None = None, padding: int = 2, pad_value: float = 0.0) -> str:
    """Writes `images` (N, H, W, C) in [0, 1] as one PNG grid; returns the path."""
    grid = make_image_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path, format="PNG")
    return path
