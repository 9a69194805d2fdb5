"""FID driver: sharded extraction, streaming metrics, reference statistics, ADM export, CLI.

The extractor runs the fixture-weight Inception at input 75 (the network's smallest) so
one compilation serves most tests; the CLI test runs the real 299 pipeline on 8 images.
"""

import json
import os

import jax
import numpy as np
import pytest

from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.conversion.inception import convert_inception
from softdimo_jax.evaluation import export, stats
from softdimo_jax.evaluation.periodic_fid import PeriodicFID
from softdimo_jax.evaluation.fid import (
    ActivationSet,
    InceptionFeatureExtractor,
    Progress,
    compute_activations,
    evaluate_images,
    fid_against_reference,
    frechet_distance_lowrank,
    precision_recall_device,
    to_uint8,
)
from softdimo_jax.evaluation.reference_stats import (
    ReferenceStats,
    center_crop_resize,
    load_reference,
    reference_from_images,
    reference_from_tfds,
    save_reference,
)
from softdimo_jax.models.inception import FIDInceptionV3
from softdimo_jax.parity import load_fixture

SMALL = FIDInceptionV3(input_size=75, precision="highest")


@pytest.fixture(scope="module")
def params(fixtures_dir):
    return convert_inception(load_fixture(str(fixtures_dir / "inception_a.npz")).sd)


@pytest.fixture(scope="module")
def extractor(params):
    return InceptionFeatureExtractor(params, mesh=meshlib.make_mesh(8), batch_size=8, model=SMALL)


def _images(n, seed, size=24):
    """Smooth random images (low-frequency colour fields), so features vary between sets."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, 4, 4, 3))
    img = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
    return np.round(img * 255).astype(np.uint8)


def test_mesh_matches_single_device(params, extractor):
    imgs = _images(8, 0)
    one = InceptionFeatureExtractor(params, mesh=meshlib.make_mesh(1), batch_size=8, model=SMALL)
    a, b = extractor(imgs), one(imgs)
    assert extractor.mesh.size == 8 and one.mesh.size == 1
    assert a["2048"].shape == (8, 2048) and a["logits_unbiased"].shape == (8, 1008)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-4, rtol=1e-4)
    assert np.std(a["2048"], axis=0).max() > 1e-3  # the images are told apart


def test_rebatching_padding_and_limits(extractor):
    imgs = _images(15, 1)
    whole = [extractor(imgs[:8]), extractor(imgs[8:])]  # second call pads 7 -> 8
    want = np.concatenate([w["2048"] for w in whole])
    chunks = [imgs[:3], imgs[3:10].astype(np.float32) / 255.0, imgs[10:]]  # mixed dtypes
    got = np.concatenate([f["2048"] for f in extractor.iter_features(iter(chunks))])
    np.testing.assert_allclose(got, want, atol=1e-5)
    limited = list(extractor.iter_features(imgs, num_images=10))
    assert sum(len(f["2048"]) for f in limited) == 10
    with pytest.raises(ValueError, match="exceeds"):
        extractor(_images(9, 2))
    with pytest.raises(ValueError, match="ended after"):
        compute_activations(imgs, extractor, num_images=20, log=None)


def test_to_uint8():
    x = np.array([[[[0.0, 0.5, 1.2]]]], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [[[[0, 128, 255]]]])
    with pytest.raises(ValueError, match="NHWC"):
        to_uint8(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.full((1, 2, 2, 3), np.nan, np.float32))


def test_fid_of_set_against_itself_is_zero(extractor):
    real, other = _images(24, 3), _images(24, 4)
    ref = reference_from_images(real, extractor, max_features=None, log=None)
    assert ref.num_samples == 24 and ref.features.shape == (24, 2048)
    same = evaluate_images(real, ref, extractor, log=None)
    assert same["fid"] < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert 1.0 <= same["inception_score"] < 1008
    diff = evaluate_images(other, ref, extractor, log=None)
    assert diff["fid"] > 100 * max(same["fid"], 1e-6)
    # The driver's streamed statistics equal one-shot ones on the same features.
    acts = compute_activations(other, extractor, log=None)
    mu, sigma = stats.moments(acts.pool)
    np.testing.assert_allclose(acts.mu, mu, atol=1e-9)
    np.testing.assert_allclose(acts.sigma, sigma, atol=1e-9)
    assert diff["fid"] == pytest.approx(frechet_distance_lowrank(ref.mu, ref.sigma, mu, acts.pool), rel=1e-9)


def test_fid_fast_paths_equal_reference_formula():
    """Both driver paths (n×n low-rank form; cached reference root) give stats.frechet_distance."""
    rng = np.random.default_rng(11)
    d = 32
    real = rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) * 0.3
    ref = ReferenceStats(*stats.moments(real))
    for n, keep in ((12, True), (90, False)):
        fake = ActivationSet(dim=d, keep_pool=keep)
        x = rng.normal(size=(n, d)) * 1.5 + 0.2
        fake.update({"2048": x[: n // 2]})
        fake.update({"2048": x[n // 2 :]})
        want = stats.frechet_distance(*stats.moments(x), ref.mu, ref.sigma)
        assert fid_against_reference(fake, ref) == pytest.approx(want, rel=1e-7)
        assert want > 1.0


def test_adm_reference_batch_and_saved_reference(tmp_path, extractor):
    real = _images(16, 5)
    ref = reference_from_images(real, extractor, max_features=None, log=None)
    # An ADM reference batch: mu/sigma of its (larger) set, arr_0 images for PR.
    mu_file = ref.mu + 1.0
    adm = str(tmp_path / "VIRTUAL_ref.npz")
    np.savez(adm, arr_0=real, mu=mu_file, sigma=ref.sigma)
    loaded = load_reference(adm, need_features=True, extractor=extractor, log=None)
    np.testing.assert_array_equal(loaded.mu, mu_file)  # file statistics are kept as they are
    np.testing.assert_allclose(loaded.features, ref.features, atol=1e-5)
    no_pr = load_reference(adm)
    assert no_pr.features is None
    with pytest.raises(ValueError, match="extractor"):
        load_reference(adm, need_features=True)
    # Only images: everything is computed from arr_0.
    only = str(tmp_path / "images_only.npz")
    np.savez(only, arr_0=real)
    from_images = load_reference(only, extractor=extractor, log=None)
    np.testing.assert_allclose(from_images.mu, ref.mu, atol=1e-6)
    # Our format round-trips.
    ours = save_reference(str(tmp_path / "ref.npz"), ref)
    back = load_reference(ours, need_features=True)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    np.testing.assert_array_equal(back.features, ref.features)
    assert back.num_samples == 16


def test_reference_from_mock_tfds(extractor):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        ref = reference_from_tfds("imagenet2012", extractor, num_samples=6, image_size=32, workers=2, log=None)
    assert ref.num_samples == 6 and ref.features.shape == (6, 2048)
    assert ref.sigma.shape == (2048, 2048) and np.all(np.isfinite(ref.sigma))
    assert ref.source == "tfds:imagenet2012/train"


def test_center_crop_resize():
    img = np.zeros((600, 400, 3), np.uint8)
    img[:, :, 0] = 200
    out = center_crop_resize(img, 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert np.all(out[..., 0] == 200) and np.all(out[..., 1] == 0)
    grey = center_crop_resize(np.full((50, 70), 7, np.uint8), 32)
    assert grey.shape == (32, 32, 3) and np.all(grey == 7)


def test_class_balanced_labels():
    labels = class_labels = export.class_balanced_labels(50_000, 1000)
    assert np.all(np.bincount(class_labels, minlength=1000) == 50) and len(labels) == 50_000
    np.testing.assert_array_equal(np.bincount(export.class_balanced_labels(10, 4)), [3, 3, 2, 2])
    # Every contiguous IS split (5000 of 50k) is balanced too.
    assert all(np.all(np.bincount(c, minlength=1000) == 5) for c in np.array_split(labels, 10))
    shuffled = export.class_balanced_labels(100, 10, seed=0)
    assert np.all(np.bincount(shuffled) == 10)
    assert not np.array_equal(shuffled, export.class_balanced_labels(100, 10))


def test_adm_export_round_trip(tmp_path):
    imgs = _images(10, 6, size=16)
    labels = export.class_balanced_labels(10, 5)
    path = str(tmp_path / "samples.npz")
    with export.AdmNpzWriter(path, 10, 16) as w:
        w.add(imgs[:4], labels[:4])
        w.add(imgs[4:].astype(np.float32) / 255.0, labels[4:])  # floats are quantised back
    with np.load(path) as z:
        assert set(z.files) == {"arr_0", "labels"}
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (10, 16, 16, 3)
    got, got_labels = export.load_adm_npz(path)
    np.testing.assert_array_equal(got, imgs)
    np.testing.assert_array_equal(got_labels, labels)
    streamed = np.concatenate(list(export.iter_npz_images(path, batch_size=3)))
    np.testing.assert_array_equal(streamed, imgs)
    assert export.npz_array_shape(path) == ((10, 16, 16, 3), np.dtype(np.uint8))
    # ADM's own sample scripts store labels as arr_1, compressed files stream too.
    legacy = str(tmp_path / "legacy.npz")
    np.savez_compressed(legacy, imgs, labels)
    np.testing.assert_array_equal(export.load_adm_npz(legacy)[1], labels)
    np.testing.assert_array_equal(np.concatenate(list(export.iter_npz_images(legacy, 4))), imgs)
    # A writer that gets fewer samples than declared leaves no file behind.
    bad = str(tmp_path / "short.npz")
    w = export.AdmNpzWriter(bad, 5, 16)
    w.add(imgs[:2], labels[:2])
    with pytest.raises(ValueError, match="2 of the declared 5"):
        w.close()
    assert not os.path.exists(bad)
    small = export.save_adm_npz(str(tmp_path / "small.npz"), imgs, labels)
    np.testing.assert_array_equal(export.load_adm_npz(small)[0], imgs)
    grid = export.save_grid(imgs, str(tmp_path / "grid.png"))
    assert os.path.getsize(grid) > 0


def test_blocked_precision_recall_equals_one_shot():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(70, 5))
    fake = rng.normal(size=(50, 5)) * 1.3 + 0.4
    want = stats.precision_recall(real, fake, k=3)
    assert stats.precision_recall_blocked(real, fake, k=3, block=16) == pytest.approx(want)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    np.testing.assert_allclose(stats.knn_radii_blocked(real, 3, block=7), stats._knn_radii(real, 3))
    assert precision_recall_device(real, fake, k=3, block=16) == pytest.approx(want)


def test_periodic_fid_hook(extractor):
    real = _images(16, 8)
    ref = reference_from_images(real, extractor, log=None)
    calls = []

    def sample_fn(n, step):
        calls.append((n, step))
        return (real[i : i + 5] for i in range(0, n, 5))  # an iterable of batches

    hook = PeriodicFID(2, sample_fn, ref, None, num_samples=16, extractor=extractor, log=None)
    results = [hook(step) for step in (1, 2, 3)]
    assert [bool(r) for r in results] == [False, True, False]  # first call only starts the clock
    assert calls == [(16, 2)]
    assert results[1]["eval/fid"] < 1e-3 and "eval/fid_inception_score" in results[1]
    assert hook.last_metrics is results[1]


def test_progress_line():
    lines = []
    p = Progress(100, "x", every_secs=0.0, log=lines.append)
    p.update(50)
    assert "50/100 (50%)" in lines[-1] and "ETA" in lines[-1]


def test_cli_end_to_end(tmp_path, params, capsys):
    """The real 299 pipeline: samples vs a reference made of the same images -> FID ~0, P=R=1."""
    from softdimo_jax.conversion.inception import save_params
    from softdimo_jax.evaluate import main

    imgs = _images(8, 9, size=32)
    samples = export.save_adm_npz(str(tmp_path / "samples.npz"), imgs, np.arange(8))
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=imgs)
    ckpt = str(tmp_path / "inception.npz")
    save_params(params, ckpt)
    out = str(tmp_path / "out")
    rc = main(["--samples", samples, "--reference", ref, "--inception", ckpt, "--out", out,
               "--batch-size", "8", "--progress-secs", "0"])
    assert rc == 0
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["num_samples"] == 8 and m["fid"] < 1e-2
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert os.path.exists(os.path.join(out, "samples_grid.png"))
    # Reference statistics from a (mock) tfds dataset, then the same samples against them.
    import tensorflow_datasets as tfds

    tfds_ref = str(tmp_path / "tfds_ref.npz")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        rc = main(["--make-reference", "imagenet2012", "--num-reference", "4", "--image-size", "32",
                   "--reference", tfds_ref, "--inception", ckpt, "--batch-size", "8",
                   "--samples", samples, "--out", out, "--no-pr"])
    assert rc == 0
    ref_back = load_reference(tfds_ref, need_features=True)
    assert ref_back.num_samples == 4 and ref_back.features.shape == (4, 2048)
    with open(os.path.join(out, "metrics.json")) as f:
        m2 = json.load(f)
    assert m2["fid"] > 0 and "precision" not in m2
    # Without the generator's checkpoints: a one-line error naming the flag, before Inception
    # is loaded (the Inception path does not even exist).
    capsys.readouterr()
    assert main(["--generator", "student", "--reference", ref, "--inception", "missing.pth"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate: ") and "--checkpoint" in err[0]


def test_cli_generates_from_converted_teacher_and_student(tmp_path, params):
    """--generator: samples come from converted checkpoints through the samplers."""
    import jax.numpy as jnp

    from softdimo_jax.conversion.inception import save_params
    from softdimo_jax.runtime.converted import save_converted
    from softdimo_jax.evaluate import main
    from softdimo_jax.models.maskbit_bert import LFQBert
    from softdimo_jax.models.maskbit_tokenizer import ConvVQModel

    gen = LFQBert(num_tokens=16, num_bits=6, splits=2, hidden_dim=32, depth=1, heads=2, mlp_dim=64,
                  num_classes=4)
    gen_params = jax.jit(gen.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 2), jnp.int32),
                                   jnp.zeros((1,), jnp.int32))["params"]
    tok = ConvVQModel(num_bits=6, hidden_channels=32, channel_mult=(1, 1), num_res_blocks=1)
    tok_params = jax.jit(tok.init)(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))["params"]
    save_converted(str(tmp_path / "G"), "maskbit_generator", gen, gen_params)
    save_converted(str(tmp_path / "T"), "maskbit_tokenizer", tok, tok_params)
    ckpt = str(tmp_path / "inception.npz")
    save_params(params, ckpt)
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=_images(8, 3, size=8))
    for mode, extra in (("teacher", ["--steps", "2", "--cfg-scale", "1.0"]), ("student", ["--decode", "soft"])):
        out = str(tmp_path / mode)
        saved = str(tmp_path / f"{mode}.npz")
        rc = main(["--generator", mode, "--checkpoint", str(tmp_path / "G"), "--tokenizer",
                   str(tmp_path / "T"), "--num-samples", "8", "--num-classes", "4", "--no-pr",
                   "--reference", ref, "--inception", ckpt, "--out", out, "--batch-size", "8",
                   "--image-size", "8", "--save-samples", saved, "--progress-secs", "0", *extra])
        assert rc == 0
        with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
        assert m["num_samples"] == 8 and np.isfinite(m["fid"]) and m["samples"] == f"generated:{mode}"
        back_images, back_labels = export.load_adm_npz(saved)
        assert back_images.shape == (8, 8, 8, 3) and back_images.dtype == np.uint8
        np.testing.assert_array_equal(np.sort(back_labels), np.repeat(np.arange(4), 2))
