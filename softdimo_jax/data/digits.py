"""scikit-learn's digits: the embedded default dataset (no download).

1,797 labelled 8×8 grey images (values 0..16), 10 classes, shipped inside the scikit-learn
wheel. It plays the part ImageNet plays at full scale.

Our fixed form of it:
- split: a stratified 80/20 split with a fixed seed (1,437 train / 360 test), the same on
  every machine and every run;
- pixels: value / 16, so images are float32 in [0, 1], NHWC with C = 1 (grey);
- size: bilinearly upsampled from 8×8 to `image_size` (default 16×16) so the conv tokenizer
  has something to downsample (16×16 → 4×4 tokens with two stride-2 stages).

Batches are chosen as a pure function of (seed, step), so a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

NUM_CLASSES = 10
SOURCE_SIZE = 8
SPLITS = ("train", "test")
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=None)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    train, test = train_test_split(
        idx, test_size=_TEST_FRACTION, random_state=_SPLIT_SEED, stratify=y
    )
    return np.sort(train), np.sort(test)


def upsample(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, h, w, C) -> (N, image_size, image_size, C), bilinear, clipped to [0, 1]."""
    n, h, w, c = images.shape
    if image_size == h == w:
        return images.astype(np.float32)
    if image_size < h:
        raise ValueError(f"image_size {image_size} is below the source size {h}")
    out = jax.image.resize(images.astype(np.float32), (n, image_size, image_size, c), "linear")
    return np.clip(np.asarray(out), 0.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _load_cached(split: str, image_size: int, channels: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    train, test = _split_indices()
    idx = train if split == "train" else test
    images = (data.images[idx] / 16.0).astype(np.float32)[..., None]
    images = upsample(images, image_size)
    if channels == 3:
        images = np.repeat(images, 3, axis=-1)
    labels = data.target[idx].astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_split(split: str, image_size: int = 16, channels: int = 1):
    """Images (N, S, S, C) float32 in [0, 1] and labels (N,) int32 of one fixed split."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {SPLITS}")
    if channels not in (1, 3):
        raise ValueError(f"digits images have 1 (grey) or 3 (grey repeated) channels, not {channels}")
    return _load_cached(split, int(image_size), int(channels))


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Global batch indices for `step`: epoch-wise permutations, a pure function of
    (seed, step), so resuming at any step reproduces the same data order."""
    if batch_size > num_examples:
        # Small sets: draw with replacement, still deterministic per step.
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, num_examples, batch_size)
    per_epoch = num_examples // batch_size
    epoch, pos = divmod(int(step), per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return perm[pos * batch_size : (pos + 1) * batch_size]


def process_slice(global_batch_size: int) -> slice:
    """This process's rows of a global batch (all rows on a single host)."""
    n_proc = jax.process_count()
    if global_batch_size % n_proc:
        raise ValueError(
            f"global batch {global_batch_size} does not divide over {n_proc} processes"
        )
    per = global_batch_size // n_proc
    i = jax.process_index()
    return slice(i * per, (i + 1) * per)


def make_batch_fn(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    """`batch_fn(step) -> {"image", "label"}`: this process's part of the global batch."""
    local = process_slice(batch_size)

    def batch_fn(step: int):
        idx = batch_indices(len(images), batch_size, step, seed)[local]
        return {"image": images[idx], "label": labels[idx]}

    return batch_fn
