"""FID Inception-v3: fixture parity, the TF1 resize, conversion strictness, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.conversion.inception import convert_inception, inception_expected_params, load_inception, save_params
from softdimo_jax.conversion.state_dict import ConversionError
from softdimo_jax.models.inception import FIDInceptionV3, resize_bilinear_tf1
from softdimo_jax.parity import load_fixture, run_fixture


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return load_fixture(str(fixtures_dir / "inception_a.npz"))


@pytest.fixture(scope="module")
def params(fixture):
    return convert_inception(fixture.sd)


def test_parity_all_sizes(fixtures_dir):
    checks = run_fixture(str(fixtures_dir / "inception_a.npz"))
    names = {c.name for c in checks}
    for size in (64, 256, 299):
        for feat in ("64", "192", "768", "2048", "logits_unbiased"):
            assert f"image_{size}/{feat}" in names
    bad = [c.line() for c in checks if not c.passed]
    assert not bad, "\n".join(bad)


def _tf1_resize_reference(img, out_h, out_w):
    """Plain-loop TF1 bilinear (align_corners=False): src = dst·in/out in float32, no offset."""
    img = img.astype(np.float32)
    in_h, in_w = img.shape[:2]
    sy, sx = np.float32(in_h / out_h), np.float32(in_w / out_w)
    out = np.zeros((out_h, out_w, img.shape[2]), np.float32)
    for i in range(out_h):
        y = np.float32(i) * sy
        y0 = int(y)
        y1 = min(y0 + 1, in_h - 1)
        fy = y - np.float32(y0)
        for j in range(out_w):
            x = np.float32(j) * sx
            x0 = int(x)
            x1 = min(x0 + 1, in_w - 1)
            fx = x - np.float32(x0)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
            bot = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
            out[i, j] = top + (bot - top) * fy
    return out


@pytest.mark.parametrize("src,dst", [((5, 7), (9, 4)), ((13, 6), (13, 11)), ((8, 8), (3, 3))])
def test_resize_matches_tf1_definition(src, dst):
    img = np.random.default_rng(0).integers(0, 256, (*src, 3)).astype(np.float32)
    got = np.asarray(resize_bilinear_tf1(jnp.asarray(img)[None], dst))[0]
    np.testing.assert_allclose(got, _tf1_resize_reference(img, *dst), atol=1e-4)
    # ...and it is not the half-pixel (align_corners=False, TF2/PyTorch) resize.
    half = np.asarray(jax.image.resize(jnp.asarray(img), (*dst, 3), "bilinear", antialias=False))
    assert np.max(np.abs(half - got)) > 1.0


def test_resize_identity_at_same_size():
    x = jnp.arange(2 * 6 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 6, 3)
    assert resize_bilinear_tf1(x, (6, 6)) is x


def test_converted_params_are_float32(params):
    dtypes = {np.asarray(x).dtype for x in jax.tree.leaves(params)}
    assert dtypes == {np.dtype(np.float32)}  # fixture weights are float16: upcast


def test_conversion_is_strict(fixture):
    sd = dict(fixture.sd)
    sd.pop("Mixed_6c.branch7x7_2.conv.weight")
    sd["Mixed_7c.extra.weight"] = np.zeros(3, np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_inception(sd)
    msg = str(e.value)
    assert "Mixed_6c.branch7x7_2.conv.weight" in msg
    assert "Mixed_7c.extra.weight" in msg
    assert "fc.bias" in msg and "(1000)" in msg


def test_conversion_accepts_module_prefix_and_skips_counters(fixture, params):
    sd = {"module." + k: v for k, v in fixture.sd.items()}
    assert any(k.endswith("num_batches_tracked") for k in fixture.sd)
    p2 = convert_inception(sd)
    a, b = jax.tree.leaves(params), jax.tree.leaves(p2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_params_npz_round_trip(tmp_path, params):
    path = str(tmp_path / "inception_params.npz")
    save_params(params, path)
    loaded = load_inception(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))


def test_input_checks(params):
    model = FIDInceptionV3(input_size=75)
    with pytest.raises(TypeError, match="uint8"):
        model.apply({"params": params}, jnp.zeros((1, 32, 32, 3), jnp.float32))
    with pytest.raises(ValueError, match="NHWC"):
        model.apply({"params": params}, jnp.zeros((1, 3, 32, 32), jnp.uint8))
    with pytest.raises(ValueError, match="unknown Inception features"):
        FIDInceptionV3(features=("pool",)).apply({"params": params}, jnp.zeros((1, 8, 8, 3), jnp.uint8))


def test_early_features_and_preprocessed_path(params):
    """Asking for an early feature stops there with the same values; the preprocessed
    entry point equals the full one; logits = unbiased logits + fc bias."""
    imgs = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 40, 40, 3)), jnp.uint8)
    full = FIDInceptionV3(input_size=75, features=("64", "2048", "logits_unbiased", "logits"))
    early = FIDInceptionV3(input_size=75, features=("64",))
    out = jax.jit(lambda p, x: full.apply({"params": p}, x))(params, imgs)
    early_fn = jax.jit(lambda p, x, pre: early.apply({"params": p}, x, preprocessed=pre), static_argnums=2)
    out_early = early_fn(params, imgs, False)
    assert set(out_early) == {"64"}
    np.testing.assert_allclose(out_early["64"], out["64"], atol=1e-5)
    x = jax.jit(lambda x: full.apply({"params": params}, x, method=FIDInceptionV3.preprocess))(imgs)
    assert x.shape == (2, 75, 75, 3) and float(jnp.max(jnp.abs(x))) <= 1.0
    np.testing.assert_allclose(early_fn(params, x, True)["64"], out_early["64"], atol=1e-6)
    np.testing.assert_allclose(out["logits"] - out["logits_unbiased"], np.broadcast_to(params["fc"]["bias"], (2, 1008)), atol=1e-4)
    assert np.all(np.asarray(out["2048"]) >= 0)  # mean of ReLU maps


def test_expected_params_cover_published_keys(fixture):
    """Every fixture key (the full-size network) maps to exactly one target leaf."""
    n_leaves = len(jax.tree.leaves(inception_expected_params(FIDInceptionV3())))
    n_keys = sum(not k.endswith("num_batches_tracked") for k in fixture.sd)
    assert n_leaves == n_keys == 472


def test_convert_cli_family(tmp_path, fixtures_dir, params):
    """`python -m softdimo_jax.convert --model fid_inception SRC DST`, then load_inception(DST)."""
    from softdimo_jax.convert import main as convert_main

    dst = str(tmp_path / "inception_ckpt")
    assert convert_main(["--model", "fid_inception", str(fixtures_dir / "inception_a.npz"), dst]) == 0
    loaded = load_inception(dst)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
