"""Real-image datasets through tensorflow-datasets (ImageNet at full scale). Never downloads.

Two readers, same preprocessing (center crop to the largest square, resize to
`image_size` with antialiasing, float32 NHWC in [0, 1], grey repeated to 3 channels):

- `TfdsImageSource` (preferred): `tfds.data_source` random access over an array_record
  build. Batches are a pure function of (seed, step) — exactly like the digits batches —
  so the Trainer's exact resume holds at full scale. Each process reads only its own rows
  of the global batch (`make_batch_fn`); the Trainer (or `to_global`) assembles the global
  array with `jax.make_array_from_process_local_data`.
- `tf_data_batches`: `tfds.load` + tf.data for builds in tfrecord format, split per process
  with `tfds.split_for_jax_process`. Streaming order, so resume restarts the stream.

Prepare ImageNet once, outside training (`tfds build imagenet2012 --file_format=array_record
--manual_dir=...`), then point `data_dir` at it. A missing dataset raises
`DatasetMissingError` saying so, instead of a download attempt.
"""

from __future__ import annotations

import jax
import numpy as np
from PIL import Image

from softdimo_jax.data.digits import batch_indices  # one rule: epoch-wise permutations of (seed, step)
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.errors import BadInput


class DatasetMissingError(BadInput, FileNotFoundError):
    """The requested tfds dataset/split is not prepared in data_dir."""


def _missing(name: str, split: str, data_dir, err: Exception) -> DatasetMissingError:
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    return DatasetMissingError(
        f"tfds dataset {name!r} split {split!r} is not available in {where} ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). Nothing is downloaded at run time: "
        f"prepare it first (e.g. `tfds build {name} --data_dir=DIR --file_format=array_record`, "
        "with --manual_dir for ImageNet) and pass data_dir=DIR."
    )


def center_crop_resize(image, image_size: int) -> np.ndarray:
    """HWC uint8 (or HW) -> (image_size, image_size, 3) float32 in [0, 1]: central square
    crop, then antialiased bicubic resize."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise ValueError(f"expected an HWC image, got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    elif img.shape[-1] == 4:
        img = img[..., :3]
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[top : top + side, left : left + side]
    if img.dtype != np.uint8:
        img = np.clip(np.round(img.astype(np.float32)), 0, 255).astype(np.uint8)
    if side != image_size:
        img = np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BICUBIC, reducing_gap=None))
    return img.astype(np.float32) / 255.0


class TfdsImageSource:
    """Random access to a prepared tfds image dataset (array_record)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_size: int = 256, image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds

        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_size, self.image_key, self.label_key = int(image_size), image_key, label_key
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # registry miss, unprepared build, missing split, wrong format
            raise _missing(name, split, data_dir, e) from e
        if len(self.source) == 0:
            raise _missing(name, split, data_dir, ValueError("the split is empty"))

    def __len__(self) -> int:
        return len(self.source)

    def get(self, indices) -> dict:
        """{"image": (n, S, S, 3) float32 [0, 1], "label": (n,) int32} for dataset indices."""
        records = [self.source[int(i)] for i in indices]
        images = np.stack([center_crop_resize(r[self.image_key], self.image_size) for r in records])
        labels = np.asarray([r[self.label_key] for r in records], np.int32)
        return {"image": images, "label": labels}


def make_batch_fn(source: TfdsImageSource, global_batch_size: int, seed: int = 0):
    """`batch_fn(step)` -> this process's rows of the global batch (host numpy), reading
    only those records."""
    n_proc, pid = jax.process_count(), jax.process_index()
    if global_batch_size % n_proc:
        raise ValueError(f"global batch {global_batch_size} does not divide over {n_proc} processes")
    per = global_batch_size // n_proc

    def batch_fn(step: int):
        idx = batch_indices(len(source), global_batch_size, step, seed)
        return source.get(idx[pid * per : (pid + 1) * per])

    return batch_fn


def to_global(local_batch, mesh):
    """Process-local host batch -> global jax arrays, batch axis over the whole mesh."""

    def one(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        meshlib.check_batch_divisible(global_shape[0], mesh)
        return jax.make_array_from_process_local_data(
            meshlib.batch_sharding(mesh, x.ndim), x, global_shape
        )

    return jax.tree.map(one, local_batch)


def tf_data_batches(name: str, split: str = "train", data_dir: str | None = None,
                    image_size: int = 256, global_batch_size: int = 256, seed: int = 0,
                    shuffle_buffer: int = 10_000, repeat: bool = True,
                    image_key: str = "image", label_key: str = "label"):
    """Iterator of this process's batches via `tfds.load` (any file format).

    The split is divided between processes with `tfds.split_for_jax_process`; each process
    yields global_batch_size / process_count rows per batch."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    n_proc = jax.process_count()
    if global_batch_size % n_proc:
        raise ValueError(f"global batch {global_batch_size} does not divide over {n_proc} processes")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(f"no prepared build under {builder.data_dir}")
        ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=True,
                                read_config=tfds.ReadConfig(shuffle_seed=seed))
    except DatasetMissingError:
        raise
    except Exception as e:
        raise _missing(name, split, data_dir, e) from e

    def prep(ex):
        img = tf.numpy_function(lambda im: center_crop_resize(im, image_size), [ex[image_key]], tf.float32)
        img.set_shape((image_size, image_size, 3))
        return {"image": img, "label": tf.cast(ex[label_key], tf.int32)}

    if repeat:
        ds = ds.repeat()
    ds = ds.shuffle(shuffle_buffer, seed=seed).map(prep, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(global_batch_size // n_proc, drop_remainder=True).prefetch(2)
    return ds.as_numpy_iterator()
