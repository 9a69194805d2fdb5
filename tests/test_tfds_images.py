"""The tfds real-image path on data the test makes (tiny builders; nothing is downloaded)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.data import tfds_images

N = 12


def _examples():
    for i in range(N):
        h, w = 24 + i, 40  # landscape: the center crop must drop the side bands
        img = np.zeros((h, w, 3), np.uint8)
        img[:, :, 1] = 200  # green centre
        left = (w - h) // 2
        img[:, :left, 0] = 255  # red bands outside the central square
        img[:, left + h :, 2] = 255
        yield i, {"image": img, "label": i % 5}


class TinyImagesArrayRecord(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)),
                 "label": tfds.features.ClassLabel(num_classes=5)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield from _examples()


class TinyImagesTfrecord(TinyImagesArrayRecord):
    pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    TinyImagesArrayRecord(data_dir=d, file_format="array_record").download_and_prepare()
    TinyImagesTfrecord(data_dir=d, file_format="tfrecord").download_and_prepare()
    return d


def _check_images(images, size):
    assert images.dtype == np.float32 and images.shape[1:] == (size, size, 3)
    assert images.min() >= 0 and images.max() <= 1
    # Only the green centre survives the crop: no red or blue band anywhere.
    np.testing.assert_allclose(images[..., 0], 0, atol=0.02)
    np.testing.assert_allclose(images[..., 2], 0, atol=0.02)
    np.testing.assert_allclose(images[..., 1], 200 / 255, atol=0.02)


def test_data_source_batches_are_cropped_labelled_and_step_deterministic(data_dir):
    src = tfds_images.TfdsImageSource("tiny_images_array_record", "train", data_dir, image_size=16)
    assert len(src) == N
    batch_fn = tfds_images.make_batch_fn(src, global_batch_size=8, seed=1)
    b = batch_fn(3)
    _check_images(b["image"], 16)
    assert b["label"].dtype == np.int32 and set(b["label"]) <= set(range(5))
    np.testing.assert_array_equal(batch_fn(3)["label"], b["label"])  # pure function of the step

    mesh = meshlib.make_mesh(8)
    g = tfds_images.to_global(b, mesh)
    assert g["image"].shape == (8, 16, 16, 3) and len(g["image"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(g["label"]), b["label"])


def test_tf_data_path(data_dir):
    it = tfds_images.tf_data_batches("tiny_images_tfrecord", "train", data_dir, image_size=8,
                                     global_batch_size=4, seed=0)
    b = next(it)
    _check_images(b["image"], 8)
    assert b["label"].shape == (4,)


def test_missing_dataset_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(tfds_images.DatasetMissingError, match="Nothing is downloaded"):
        tfds_images.TfdsImageSource("imagenet2012", "train", str(tmp_path))
    with pytest.raises(tfds_images.DatasetMissingError, match="not available"):
        tfds_images.tf_data_batches("tiny_images_tfrecord", "train", str(tmp_path))


def test_center_crop_resize_grey_and_portrait():
    img = np.zeros((50, 20), np.uint8)
    img[15:35] = 255  # central 20x20 square of a portrait grey image
    out = tfds_images.center_crop_resize(img, 10)
    assert out.shape == (10, 10, 3)
    np.testing.assert_allclose(out, 1.0, atol=0.01)
