"""LFQBert over an 8-device CPU mesh (batch sharded, params replicated) equals 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from softdimo_jax import parity
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.conversion.maskbit import convert_maskbit_bert
from softdimo_jax.models.maskbit_bert import maskbit_bert_from_cfg


def test_sharded_forward_matches_single_device(fixtures_dir):
    assert jax.device_count() >= 8, "tests/conftest.py should give 8 fake CPU devices"
    fx = parity.load_fixture(str(fixtures_dir / "maskbit_bert_a.npz"))
    model = maskbit_bert_from_cfg(fx.cfg)
    params = convert_maskbit_bert(fx.sd, model)

    rng = np.random.RandomState(0)
    b = 16
    tokens = rng.randint(0, model.mask_token + 1, size=(b, model.num_tokens, model.splits)).astype(np.int32)
    labels = rng.randint(0, model.num_classes, size=(b,)).astype(np.int32)
    drop = rng.rand(b) < 0.3

    def forward(p, t, y, m):
        logits, feats = model.apply({"params": p}, t, y, drop_label_mask=m, return_features=True)
        return logits, feats[-1]

    with jax.default_matmul_precision("float32"):
        single = jax.device_put((params, tokens, labels, drop), jax.devices()[0])
        want_logits, want_feat = jax.jit(forward)(*single)

        explicit = meshlib.make_mesh(8)  # jax.make_mesh: Explicit axis types
        auto = Mesh(explicit.devices, explicit.axis_names, axis_types=(AxisType.Auto,) * 2)
        for mesh in (explicit, auto):
            p_rep = jax.device_put(params, meshlib.replicated(mesh))
            t, y, m = meshlib.shard_batch((tokens, labels, drop), mesh)
            assert len(t.sharding.device_set) == 8
            got_logits, got_feat = jax.jit(forward)(p_rep, t, y, m)
            assert len(got_logits.sharding.device_set) == 8
            np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-5, rtol=0)
            np.testing.assert_allclose(np.asarray(got_feat), np.asarray(want_feat), atol=1e-5, rtol=0)
    # And both equal the PyTorch reference on the fixture's own inputs.
    ref = jax.jit(forward)(p_rep, *meshlib.shard_batch(
        (np.repeat(fx.inputs["tokens"].astype(np.int32), 8, 0)[:24],
         np.repeat(fx.inputs["labels"].astype(np.int32), 8, 0)[:24],
         np.repeat(fx.inputs["drop_label_mask"], 8, 0)[:24]), mesh))[0]
    np.testing.assert_allclose(np.asarray(ref)[::8], fx.outputs["logits"], atol=2e-4)


def test_tokenizer_sharded_decode_matches(fixtures_dir):
    from softdimo_jax.conversion.maskbit import convert_maskbit_tokenizer
    from softdimo_jax.models.maskbit_tokenizer import maskbit_tokenizer_from_cfg

    fx = parity.load_fixture(str(fixtures_dir / "maskbit_tokenizer_a.npz"))
    model = maskbit_tokenizer_from_cfg(fx.cfg)
    params = convert_maskbit_tokenizer(fx.sd, model)
    idx = np.tile(fx.outputs["indices"].astype(np.int32), (4, 1, 1))  # batch 8
    mesh = meshlib.make_mesh(8)
    decode = jax.jit(lambda p, i: model.apply({"params": p}, i, method=model.decode_tokens))
    with jax.default_matmul_precision("float32"):
        got = decode(jax.device_put(params, meshlib.replicated(mesh)), meshlib.shard_batch(idx, mesh))
    np.testing.assert_allclose(np.asarray(got)[:2].transpose(0, 3, 1, 2), fx.outputs["decoded"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(got)[6:], np.asarray(got)[:2], atol=1e-6)
    images = np.tile(fx.inputs["image"].transpose(0, 2, 3, 1), (4, 1, 1, 1))
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode)["indices"])
    with jax.default_matmul_precision("float32"):
        ids = encode(jax.device_put(params, meshlib.replicated(mesh)), meshlib.shard_batch(images, mesh))
    np.testing.assert_array_equal(np.asarray(ids)[:2], fx.outputs["indices"])
