"""The differentiable CLIP preprocessing (models/image_preprocess.py).

References independent of our code: PIL's float ('F' mode) bicubic resize is the same
antialiased a = −0.5 filter the originals' tensor path uses (torchvision's Resize with
antialias); the crop anchors are the originals' rules written out by hand. The parity
fixtures' `raw_image` → `preprocessed` check runs in the parity tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from softdimo_jax.models import image_preprocess as ip


def _pil_resize(x, oh, ow):
    return np.asarray(Image.fromarray(x.astype(np.float32), mode="F").resize((ow, oh), Image.BICUBIC))


@pytest.mark.parametrize("h,w,oh,ow", [(64, 48, 42, 32), (20, 30, 45, 13), (17, 17, 5, 9), (9, 31, 9, 8)])
def test_resize_matches_pil_antialiased_bicubic(h, w, oh, ow):
    x = np.random.default_rng(h * w).random((h, w))
    ours = ip.resize_matrix(h, oh) @ x @ ip.resize_matrix(w, ow).T
    np.testing.assert_allclose(ours, _pil_resize(x, oh, ow), atol=2e-6)


def test_resize_rows_sum_to_one_and_identity_at_same_size():
    m = ip.resize_matrix(13, 7)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(ip.resize_matrix(11, 11), np.eye(11), atol=1e-12)


def test_output_size_and_crop_rules():
    assert ip.resized_shape(64, 48, 32) == (42, 32)  # int(32·64/48) = 42
    assert ip.resized_shape(48, 64, 21) == (21, 28)
    # torchvision: Python round, half to even (13/2 → 6, 11/2 → 6, 5/2 → 2); transformers floors.
    assert ip.crop_offset(32 + 13, 32, "torchvision") == 6
    assert ip.crop_offset(32 + 11, 32, "torchvision") == 6
    assert ip.crop_offset(32 + 5, 32, "torchvision") == 2
    assert ip.crop_offset(21 + 7, 21, "floor") == 3
    assert ip.crop_offset(21 + 7, 21, "torchvision") == 4
    with pytest.raises(ValueError, match="crop rule"):
        ip.crop_offset(10, 5, "centre")


@pytest.mark.parametrize("crop", ["torchvision", "floor"])
def test_clip_preprocess_equals_resize_crop_normalise(crop):
    rng = np.random.default_rng(3)
    imgs = rng.random((2, 57, 40, 3)).astype(np.float32)
    s = 24
    out = np.asarray(ip.clip_preprocess(imgs, s, crop=crop))
    rh, rw = ip.resized_shape(57, 40, s)
    top, left = ip.crop_offset(rh, s, crop), ip.crop_offset(rw, s, crop)
    mean, std = np.asarray(ip.OPENAI_CLIP_MEAN), np.asarray(ip.OPENAI_CLIP_STD)
    for b in range(2):
        for c in range(3):
            ref = _pil_resize(imgs[b, :, :, c], rh, rw)[top : top + s, left : left + s]
            np.testing.assert_allclose(out[b, :, :, c], (ref - mean[c]) / std[c], atol=1e-5)


def test_gradient_flows_to_every_pixel_region():
    imgs = jnp.asarray(np.random.default_rng(0).random((1, 30, 20, 3)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(ip.clip_preprocess(x, 16) ** 2))(imgs)
    assert g.shape == imgs.shape and bool(jnp.all(jnp.isfinite(g)))
    # the centre crop drops the top/bottom rows only; columns all contribute
    assert float(jnp.abs(g[:, 15]).sum()) > 0 and float(jnp.abs(g[:, :, 0]).sum()) > 0


def test_bad_layout_is_refused():
    with pytest.raises(ValueError, match="NHWC"):
        ip.clip_preprocess(jnp.zeros((1, 3, 32, 32)), 16)
