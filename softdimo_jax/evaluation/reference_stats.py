"""Reference statistics for FID / precision-recall: compute, save, load.

Our `.npz` holds `mu` (2048,), `sigma` (2048, 2048) float64, `num_samples`, and optionally
`features` (M, 2048) float32 pool features of a subset, for precision/recall.

An ADM reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`) holds `mu`, `sigma` and
usually `arr_0` (its uint8 images); `load_reference` reads those mu/sigma as they are and,
when precision/recall is wanted, computes the reference features from `arr_0`.

From the command line, from a prepared tfds dataset, a folder of images, or an ADM-style
`.npz` of images (`arr_0` uint8 N×H×W×3):

    python -m softdimo_jax.evaluate --make-reference imagenet2012 --split train \
        --reference ref_imagenet256.npz --inception pt_inception-2015-12-05-6726825d.pth
    python -m softdimo_jax.evaluate --make-reference path/to/images/ --reference ref.npz --inception ...
    python -m softdimo_jax.evaluate --make-reference real_images.npz --reference ref.npz --inception ...
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from softdimo_jax.evaluation import export
from softdimo_jax.evaluation.fid import InceptionFeatureExtractor, compute_activations
from softdimo_jax.runtime.artifacts import log as log_line
from softdimo_jax.runtime.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".jpe", ".tif", ".tiff")


@dataclasses.dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None  # pool features of (a subset of) the reference set
    num_samples: int = 0
    source: str = ""

    def __post_init__(self):
        self.mu = np.asarray(self.mu, np.float64)
        self.sigma = np.asarray(self.sigma, np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (len(self.mu), len(self.mu)):
            raise ValueError(f"reference mu {self.mu.shape} / sigma {self.sigma.shape} are not (D,) and (D, D)")
        if self.features is not None:
            self.features = np.asarray(self.features, np.float32)
            if self.features.ndim != 2 or self.features.shape[1] != len(self.mu):
                raise ValueError(f"reference features {self.features.shape} do not match mu {self.mu.shape}")
        self._sqrt_sigma: np.ndarray | None = None

    def sqrt_sigma(self) -> np.ndarray:
        """Symmetric PSD square root of sigma, computed once (a 2048² eigh costs seconds;
        periodic FID evaluations against the same reference reuse it)."""
        if self._sqrt_sigma is None:
            s = (self.sigma + self.sigma.T) / 2
            w, v = np.linalg.eigh(s)
            self._sqrt_sigma = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        return self._sqrt_sigma


def save_reference(path: str, ref: ReferenceStats) -> str:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {"mu": ref.mu, "sigma": ref.sigma, "num_samples": np.asarray(ref.num_samples, np.int64)}
    if ref.features is not None:
        arrays["features"] = ref.features.astype(np.float32)
    np.savez(path, **arrays)
    return path


def load_reference(path: str, *, need_features: bool = False, extractor: InceptionFeatureExtractor | None = None,
                   max_features: int | None = None, log: Callable[[str], None] | None = log_line) -> ReferenceStats:
    """Reads our reference `.npz` or an ADM reference batch.

    mu/sigma are taken from the file when present (an ADM batch's statistics were made on
    its full reference set, which may be larger than `arr_0`). With `need_features=True`
    and no stored `features`, the pool features of the file's `arr_0` images are computed
    with `extractor` (this is how the ADM evaluator gets its precision/recall reference).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference statistics not found: {path!r}")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        mu = np.asarray(z["mu"]) if "mu" in keys else None
        sigma = np.asarray(z["sigma"]) if "sigma" in keys else None
        feats = np.asarray(z["features"]) if "features" in keys else None
        n = int(z["num_samples"]) if "num_samples" in keys else 0
        has_images = "arr_0" in keys
        images = z["arr_0"] if has_images and (mu is None or (need_features and feats is None)) else None
    if mu is None or sigma is None:
        if images is None:
            raise ValueError(f"{path}: no `mu`/`sigma` and no `arr_0` images to compute them from; keys: {sorted(keys)}")
    if images is not None:
        if extractor is None:
            raise ValueError(
                f"{path}: computing reference features from `arr_0` needs an Inception extractor "
                "(pass extractor=..., or skip precision/recall)"
            )
        acts = compute_activations(images, extractor, keep_logits=False, max_pool=max_features,
                                   desc=f"reference {os.path.basename(path)}", log=log)
        feats = acts.pool
        if mu is None:
            mu, sigma, n = acts.mu, acts.sigma, acts.n
        n = n or acts.n
    elif need_features and feats is None:
        raise ValueError(f"{path}: precision/recall needs reference `features` or `arr_0` images; the file has {sorted(keys)}")
    return ReferenceStats(mu, sigma, feats, n, source=path)


def reference_from_images(images: Any, extractor: InceptionFeatureExtractor, *, num_images: int | None = None,
                          max_features: int | None = 50_000, source: str = "",
                          log: Callable[[str], None] | None = log_line) -> ReferenceStats:
    """Reference statistics of a stream of real images (array or iterable of batches)."""
    acts = compute_activations(images, extractor, num_images=num_images, keep_logits=False,
                               keep_pool=max_features != 0, max_pool=max_features, desc="reference", log=log)
    return ReferenceStats(acts.mu, acts.sigma, acts.pool, acts.n, source=source)


def center_crop_resize(image: np.ndarray, size: int = 256) -> np.ndarray:
    """ADM's ImageNet preprocessing: halve with a box filter while the short side is at
    least 2·size, bicubic-resize the short side to `size`, centre-crop size×size. uint8 HWC."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HWC image, got shape {img.shape}")
    pil = Image.fromarray(img[..., :3].astype(np.uint8))
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def iter_data_source(source: Sequence[Any], indices: Sequence[int], *, image_key: str = "image",
                     image_size: int = 256, batch_size: int = 256, workers: int = 8) -> Iterator[np.ndarray]:
    """Batches of centre-cropped uint8 images from a random-access source (tfds.data_source).
    Decoding and resizing run in a thread pool (PIL and the JPEG decoder release the GIL)."""

    def load(i: int) -> np.ndarray:
        ex = source[int(i)]
        img = ex[image_key] if isinstance(ex, dict) else ex
        return center_crop_resize(np.asarray(img), image_size)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(indices), batch_size):
            yield np.stack(list(pool.map(load, indices[start : start + batch_size])))


def open_tfds_source(name: str, split: str = "train", data_dir: str | None = None):
    """`tfds.data_source` of a prepared dataset, or a one-line BadInput saying what to install
    or prepare (instead of tfds' own multi-line errors)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise BadInput("tensorflow_datasets is not installed — pip install tensorflow-datasets array-record, or "
                       "pass an image folder or an ADM .npz to --make-reference instead") from None
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises assorted errors for unknown / unprepared datasets
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInput(
            f"tfds dataset {name!r} (split {split!r}, data_dir {data_dir or 'default'}) cannot be read: {first} — "
            f"prepare it first (`tfds build {name} --data_dir DIR`; Beam-built datasets also need "
            "`pip install apache-beam`, ImageNet a manual download), or pass an image folder or an ADM .npz "
            "of images to --make-reference") from None


def reference_from_tfds(name: str, extractor: InceptionFeatureExtractor, *, split: str = "train",
                        data_dir: str | None = None, image_size: int = 256, num_samples: int | None = 50_000,
                        seed: int = 0, image_key: str = "image", max_features: int | None = 50_000,
                        workers: int = 8, log: Callable[[str], None] | None = log_line) -> ReferenceStats:
    """Reference statistics of a tfds dataset prepared as array_record (`tfds.data_source`).

    Takes `num_samples` images (a seeded random subset; None = the whole split), ADM
    centre crop at `image_size`. The dataset must already be prepared in `data_dir`
    (nothing is downloaded here: ImageNet needs a manual download anyway).
    """
    source = open_tfds_source(name, split, data_dir)
    total = len(source)
    if num_samples is None or num_samples >= total:
        indices = np.arange(total)
    else:
        indices = np.sort(np.random.default_rng(seed).choice(total, size=num_samples, replace=False))
    batches = iter_data_source(source, indices, image_key=image_key, image_size=image_size,
                               batch_size=extractor.local_batch_size, workers=workers)
    # The subset is random, so keeping the first `max_features` is a random subset for PR.
    return reference_from_images(batches, extractor, num_images=len(indices), max_features=max_features,
                                 source=f"tfds:{name}/{split}", log=log)


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursively, sorted), by suffix."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(out)


def _subset(total: int, num_samples: int | None, seed: int) -> np.ndarray:
    if num_samples is None or num_samples >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=num_samples, replace=False))


def reference_from_folder(folder: str, extractor: InceptionFeatureExtractor, *, image_size: int = 256,
                          num_samples: int | None = 50_000, seed: int = 0, max_features: int | None = 50_000,
                          workers: int = 8, log: Callable[[str], None] | None = log_line) -> ReferenceStats:
    """Reference statistics of the images in a folder (PNG / JPEG / WebP / ..., searched
    recursively): a seeded random subset of `num_samples` (None = all), ADM centre crop at
    `image_size`."""
    files = list_images(folder)
    if not files:
        raise BadInput(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder} — pass a folder of real images")

    def read(i):
        with Image.open(files[int(i)]) as im:
            return np.asarray(im.convert("RGB"))

    indices = _subset(len(files), num_samples, seed)
    source = _LazyImages(read, len(files))
    batches = iter_data_source(source, indices, image_size=image_size, batch_size=extractor.local_batch_size,
                               workers=workers)
    return reference_from_images(batches, extractor, num_images=len(indices), max_features=max_features,
                                 source=f"folder:{folder}", log=log)


class _LazyImages:
    """A random-access sequence of decoded images (what iter_data_source reads)."""

    def __init__(self, read: Callable[[int], np.ndarray], n: int):
        self.read, self.n = read, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.read(i)


def reference_from_npz(path: str, extractor: InceptionFeatureExtractor, *, num_samples: int | None = 50_000,
                       max_features: int | None = 50_000,
                       log: Callable[[str], None] | None = log_line) -> ReferenceStats:
    """Reference statistics of an ADM-style `.npz` of images (`arr_0` uint8 N×H×W×3), its
    first `num_samples` images (None = all), as stored (no crop)."""
    try:
        shape, dtype = export.npz_array_shape(path)
    except (OSError, KeyError, ValueError) as e:
        raise BadInput(f"{path} is not an ADM-style .npz of images ({e}) — it needs arr_0, uint8 N×H×W×3") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise BadInput(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {dtype} {shape}")
    n = shape[0] if num_samples is None else min(num_samples, shape[0])
    batches = export.iter_npz_images(path, batch_size=extractor.local_batch_size)
    return reference_from_images(batches, extractor, num_images=n, max_features=max_features,
                                 source=f"npz:{path}", log=log)


def check_reference_source(source: str, split: str = "train", data_dir: str | None = None) -> str:
    """What `--make-reference SOURCE` names ('folder', 'npz' or 'tfds'), checked before any
    Inception work: a missing path or an unreadable dataset is a one-line BadInput."""
    if os.path.isdir(source):
        return "folder"
    if source.endswith(".npz"):
        if not os.path.exists(source):
            raise BadInput(f"--make-reference {source}: no such file — pass an existing .npz of images")
        return "npz"
    if os.sep in source or source.startswith("."):
        raise BadInput(f"--make-reference {source}: no such folder — pass a folder of images, an ADM .npz of "
                       "images or a tfds dataset name")
    open_tfds_source(source, split, data_dir)
    return "tfds"


def reference_from_source(source: str, extractor: InceptionFeatureExtractor, *, split: str = "train",
                          data_dir: str | None = None, image_size: int = 256, num_samples: int | None = 50_000,
                          seed: int = 0, max_features: int | None = 50_000,
                          log: Callable[[str], None] | None = log_line) -> ReferenceStats:
    """`--make-reference SOURCE`: a folder of images, an ADM `.npz` of images, or a tfds name."""
    kind = check_reference_source(source, split, data_dir)
    if kind == "folder":
        return reference_from_folder(source, extractor, image_size=image_size, num_samples=num_samples, seed=seed,
                                     max_features=max_features, log=log)
    if kind == "npz":
        return reference_from_npz(source, extractor, num_samples=num_samples, max_features=max_features, log=log)
    return reference_from_tfds(source, extractor, split=split, data_dir=data_dir, image_size=image_size,
                               num_samples=num_samples, seed=seed, max_features=max_features, log=log)
