"""Samples in the ADM evaluator's `.npz` convention, class-balanced labels, PNG grids.

The ADM evaluator (guided-diffusion `evaluations/evaluator.py`, used by the MaskBit / TiTok
papers) reads `arr_0`: uint8 (N, H, W, 3). We also store `labels` (N,) int64. Its sample
scripts store labels as `arr_1`; the readers here accept either.

50k samples at 256² are 9.8 GB, so `AdmNpzWriter` streams them into the zip member batch
by batch, and `iter_npz_images` reads them back the same way.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Iterator

import numpy as np

from softdimo_jax.evaluation.fid import to_uint8
from softdimo_jax.runtime.artifacts import save_image_grid
from softdimo_jax.sampling.batching import class_ordered_labels

IMAGES_KEY, LABELS_KEY = "arr_0", "labels"
_LABEL_KEYS = ("labels", "arr_1")


def class_balanced_labels(num_samples: int, num_classes: int = 1000, *, seed: int | None = None) -> np.ndarray:
    """Labels with every class equally often (50 per class for 50k over 1000 classes).

    Order 0, 1, …, C−1, 0, 1, … (the TiTok / MaskBit evaluation convention), so that any
    contiguous chunk is class-balanced too: the ADM evaluator computes IS over contiguous
    splits, which class-major order (0, 0, …, 1, 1, …) would bias badly. With `seed`, a
    seeded permutation instead. When num_samples is not a multiple of num_classes, the
    first num_samples % num_classes classes get one sample more.
    """
    if num_samples < 0 or num_classes < 1:
        raise ValueError(f"need num_samples >= 0 and num_classes >= 1, got {num_samples}, {num_classes}")
    labels = class_ordered_labels(num_samples, num_classes).astype(np.int64)
    if seed is not None:
        labels = np.random.default_rng(seed).permutation(labels)
    return labels


def _npy_header(shape: tuple[int, ...], dtype) -> bytes:
    import io

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


class AdmNpzWriter:
    """Streams (N, H, W, 3) uint8 images (+ labels) into an ADM-style `.npz`.

        with AdmNpzWriter("samples.npz", 50_000, 256) as w:
            for images, labels in batches:
                w.add(images, labels)      # images uint8, or float in [0, 1]

    The total must be known up front (it is in the .npy header); closing with a different
    count raises, and the incomplete file is removed.
    """

    def __init__(self, path: str, num_samples: int, image_size: int | tuple[int, int], *, with_labels: bool = True):
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.path, self.num_samples, self.shape = path, int(num_samples), (int(num_samples), int(h), int(w), 3)
        self.with_labels = with_labels
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open(IMAGES_KEY + ".npy", "w", force_zip64=True)
        self._member.write(_npy_header(self.shape, np.uint8))
        self._labels: list[np.ndarray] = []
        self.count = 0

    def add(self, images, labels=None) -> None:
        x = to_uint8(images)
        if x.shape[1:] != self.shape[1:]:
            raise ValueError(f"images of shape {x.shape[1:]} do not match the file's {self.shape[1:]}")
        if self.count + len(x) > self.num_samples:
            raise ValueError(f"more than the declared {self.num_samples} samples")
        if self.with_labels:
            if labels is None:
                raise ValueError("this writer stores labels: pass labels=... (or with_labels=False)")
            labels = np.asarray(labels, np.int64).reshape(-1)
            if len(labels) != len(x):
                raise ValueError(f"{len(labels)} labels for {len(x)} images")
            self._labels.append(labels)
        self._member.write(np.ascontiguousarray(x).tobytes())
        self.count += len(x)

    def close(self) -> str:
        self._member.close()
        if self.count != self.num_samples:
            self._zip.close()
            os.remove(self.path)
            raise ValueError(f"{self.path}: wrote {self.count} of the declared {self.num_samples} samples; file removed")
        if self.with_labels:
            with self._zip.open(LABELS_KEY + ".npy", "w", force_zip64=True) as f:
                labels = np.concatenate(self._labels) if self._labels else np.zeros((0,), np.int64)
                f.write(_npy_header(labels.shape, np.int64))
                f.write(labels.tobytes())
        self._zip.close()
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # leave no half-written file behind
            self._member.close()
            self._zip.close()
            if os.path.exists(self.path):
                os.remove(self.path)


def save_adm_npz(path: str, images, labels=None) -> str:
    """Writes all images at once (small sets); see AdmNpzWriter for 50k."""
    x = to_uint8(images)
    arrays = {IMAGES_KEY: x}
    if labels is not None:
        labels = np.asarray(labels, np.int64).reshape(-1)
        if len(labels) != len(x):
            raise ValueError(f"{len(labels)} labels for {len(x)} images")
        arrays[LABELS_KEY] = labels
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)
    return path


def load_adm_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W, 3), labels or None) from an ADM-style sample file."""
    with np.load(path, allow_pickle=False) as z:
        if IMAGES_KEY not in z.files:
            raise ValueError(f"{path}: no `arr_0` images (keys: {z.files}); not an ADM sample file")
        images = np.asarray(z[IMAGES_KEY])
        labels = next((np.asarray(z[k]) for k in _LABEL_KEYS if k in z.files), None)
    _check_images(images, path)
    return images, labels


def _check_images(images: np.ndarray, path: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: `arr_0` must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")


def npz_array_shape(path: str, key: str = IMAGES_KEY) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one member of an .npz, read from its header only."""
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        shape, _, dtype = _read_header(f)
    return tuple(shape), dtype


def _read_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def iter_npz_images(path: str, batch_size: int = 256, key: str = IMAGES_KEY) -> Iterator[np.ndarray]:
    """Yields `key` of an .npz in batches without loading it whole (works for stored and
    deflated members)."""
    with zipfile.ZipFile(path) as zf:
        if key + ".npy" not in zf.namelist():
            raise ValueError(f"{path}: no `{key}` (members: {zf.namelist()})")
        with zf.open(key + ".npy") as f:
            shape, fortran, dtype = _read_header(f)
            if fortran:
                raise ValueError(f"{path}: Fortran-ordered `{key}` is not supported")
            row = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise ValueError(f"{path}: `{key}` is truncated at row {start}")
                yield np.frombuffer(buf, dtype).reshape((n, *shape[1:]))


def save_grid(images, path: str, nrow: int | None = None, max_images: int = 64) -> str:
    """PNG grid of the first `max_images` images (uint8 or float in [0, 1])."""
    x = to_uint8(np.asarray(images)[:max_images]).astype(np.float32) / 255.0
    return save_image_grid(x, path, nrow=nrow)
