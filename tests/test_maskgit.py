"""MaskGIT family: MaskTransformer + taming VQGAN ports, converters, samplers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.conversion.maskgit import (
    VQGAN_IGNORE_PREFIXES,
    convert_maskgit_transformer,
    convert_taming_vqgan,
)
from softdimo_jax.conversion.state_dict import ConversionError
from softdimo_jax.models.maskgit import (
    IMAGENET256_CFG,
    MaskGITTransformer,
    maskgit_expected_params,
    maskgit_transformer_from_cfg,
    perturb_embeddings,
)
from softdimo_jax.models.taming_vqgan import (
    IMAGENET_F16_1024_CFG,
    TamingVQModel,
    taming_vqgan_from_cfg,
    vqgan_expected_params,
)
from softdimo_jax.parity import load_fixture
from softdimo_jax.parity_checks.maskgit import check_transformer, check_vqgan
from softdimo_jax.sampling import maskgit_sampler as ms

TINY_VIT = dict(img_size=64, hidden_dim=32, codebook_size=24, depth=2, heads=4, mlp_dim=64, dropout=0.0, nclass=5)
TINY_VQ = dict(
    ddconfig=dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32,
                  ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0),
    n_embed=16, embed_dim=8,
)


def _random_params(expected, seed: int, scale: float = 0.2):
    """Random params of the right shapes without compiling `init` (keeps the tests fast)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32), expected)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def tiny_vit():
    model = maskgit_transformer_from_cfg(TINY_VIT)
    params = _random_params(maskgit_expected_params(model), 0)
    params["tok_emb"]["embedding"] = params["tok_emb"]["embedding"] * 5.0  # torch's N(0, 1) scale
    return model, params


# --- parity fixtures -------------------------------------------------------------------
@pytest.mark.parametrize("name,check", [("maskgit_transformer_a.npz", check_transformer),
                                        ("taming_vqgan_a.npz", check_vqgan)])
def test_parity_fixtures(fixtures_dir, name, check):
    checks = check(load_fixture(str(fixtures_dir / name)))
    assert len(checks) >= 2
    assert all(c.passed for c in checks), "\n".join(c.line() for c in checks)


# --- converters -------------------------------------------------------------------------
def test_full_size_state_dicts_convert(fixtures_dir):
    shapes = json.loads((fixtures_dir / "maskgit_full_shapes.json").read_text())
    vit = maskgit_transformer_from_cfg(IMAGENET256_CFG)
    sd = {k: np.zeros(s, np.float32) for k, s in shapes["maskgit_transformer_imagenet256"].items()}
    params = convert_maskgit_transformer(sd, vit)
    n = _count(params)
    assert n == sum(int(np.prod(s)) for s in shapes["maskgit_transformer_imagenet256"].values())
    assert 170e6 < n < 178e6
    assert _count(maskgit_expected_params(vit)) == n
    del sd, params

    vq = taming_vqgan_from_cfg(IMAGENET_F16_1024_CFG)
    sd = {k: np.zeros(s, np.float32) for k, s in shapes["taming_vqgan_f16_1024"].items()}
    loss_keys = ["loss.logvar", "loss.discriminator.main.0.weight", "loss.perceptual_loss.net.slice1.0.weight"]
    for k in loss_keys:
        sd[k] = np.zeros((4, 3), np.float32)
    params, ignored = convert_taming_vqgan(sd, vq, return_ignored=True)
    assert sorted(ignored) == sorted(loss_keys)
    n = _count(params)
    assert n == sum(int(np.prod(s)) for s in shapes["taming_vqgan_f16_1024"].values())
    assert 70e6 < n < 75e6
    assert _count(vqgan_expected_params(vq)) == n


def _tiny_vit_sd(model):
    """A random torch-layout state dict for `model` made from its own converter's key list."""
    expected = maskgit_expected_params(model)
    # Convert an empty dict to learn every key and source shape from the error report.
    with pytest.raises(ConversionError) as err:
        convert_maskgit_transformer({}, model)
    sd = {}
    for line in str(err.value).splitlines():
        line = line.strip()
        if line.endswith(")") and "(" in line and " " in line:
            key, shape = line.split(" ", 1)
            sd[key] = np.random.default_rng(len(sd)).normal(size=eval(shape)).astype(np.float32)
    assert _count(expected) == sum(v.size for v in sd.values())
    return sd


def test_transformer_converter_is_strict():
    model = maskgit_transformer_from_cfg(TINY_VIT)
    sd = _tiny_vit_sd(model)
    params = convert_maskgit_transformer(sd, model)
    # in_proj (3d, d) packs q, k, v: our Dense kernel is its transpose.
    np.testing.assert_array_equal(params["layer_1"]["attn"]["in_proj"]["kernel"],
                                  sd["transformer.layers.1.0.fn.mha.in_proj_weight"].T)
    # DDP's module. prefix is accepted.
    convert_maskgit_transformer({"module." + k: v for k, v in sd.items()}, model)

    bad = dict(sd)
    del bad["pos_emb"]
    bad["transformer.layers.2.0.norm.weight"] = np.zeros(32, np.float32)  # a layer the model lacks
    bad["bias"] = np.zeros((17, 3), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_maskgit_transformer(bad, model)
    msg = str(err.value)
    assert "missing keys (1)" in msg and "pos_emb" in msg
    assert "unexpected keys (1)" in msg and "transformer.layers.2.0.norm.weight" in msg
    assert "misshapen keys (1)" in msg and "bias" in msg


def test_vqgan_converter_skips_only_loss_keys():
    vq = taming_vqgan_from_cfg(TINY_VQ)
    fx_shapes = jax.tree_util.tree_map(lambda x: x.shape, vqgan_expected_params(vq))
    assert fx_shapes["codebook"] == (16, 8)
    with pytest.raises(ConversionError) as err:
        convert_taming_vqgan({"loss.discriminator.w": np.zeros(2)}, vq)
    msg = str(err.value)
    assert "quantize.embedding.weight (16, 8)" in msg and "loss." not in msg
    assert VQGAN_IGNORE_PREFIXES == ("loss.",)
    # A stray non-loss key is unexpected, not ignored.
    with pytest.raises(ConversionError, match="unexpected keys"):
        convert_taming_vqgan({"lossy.x": np.zeros(2)}, vq)


def test_cfg_builders_validate():
    with pytest.raises(ValueError, match="unknown MaskTransformer config keys"):
        maskgit_transformer_from_cfg(dict(TINY_VIT, patch=3))
    assert maskgit_transformer_from_cfg({}).heads == 8  # the constructor's default
    assert MaskGITTransformer().heads == 16  # Di[M]O's teacher
    with pytest.raises(ValueError, match="double_z"):
        taming_vqgan_from_cfg(dict(TINY_VQ, ddconfig=dict(TINY_VQ["ddconfig"], double_z=True)))
    whole_yaml = {"model": {"params": dict(TINY_VQ, lossconfig={"target": "x"})}}
    assert taming_vqgan_from_cfg(whole_yaml).n_embed == 16
    with pytest.raises(NotImplementedError, match="remap"):
        taming_vqgan_from_cfg(dict(TINY_VQ, remap="used.npy"))
    # resamp_with_conv=False: average-pool / plain nearest resampling, no resampling convs.
    no_conv = taming_vqgan_from_cfg(dict(TINY_VQ, ddconfig=dict(TINY_VQ["ddconfig"], resamp_with_conv=False)))
    enc = vqgan_expected_params(no_conv)["encoder"]
    assert "down_0_downsample" not in enc and "down_0_block_0" in enc


# --- transformer API --------------------------------------------------------------------
def test_transformer_paths_agree(tiny_vit):
    model, params = tiny_vit
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 25, (3, 4, 4)), jnp.int32)  # includes MASK = 24
    labels = jnp.asarray([0, 3, 4], jnp.int32)
    drop = jnp.asarray([False, True, False])
    table = params["tok_emb"]["embedding"]
    assert table.shape == (24 + 5 + 2, 32)

    @jax.jit
    def outputs(params):
        v = {"params": params}
        logits, feats = model.apply(v, tokens, labels, drop_label=drop, return_features=True)
        emb = model.apply(v, tokens, method=MaskGITTransformer.embed_tokens)
        via_emb = model.apply(v, None, labels, drop_label=drop, input_embeddings=emb)
        # One-hot soft embeddings reproduce the hard ones.
        soft = model.apply(v, jax.nn.one_hot(tokens.reshape(3, 16), 25), method=MaskGITTransformer.soft_embed)
        only_cond = model.apply(v, tokens, labels)
        # Label 3 given the null row: must equal the dropped sample.
        null_table = table.at[24 + 1 + 3].set(table[-1])
        as_null = model.apply({"params": dict(params, tok_emb={"embedding": null_table})}, tokens, labels)
        return dict(logits=logits, feats=feats, emb=emb, via_emb=via_emb, soft=soft, only_cond=only_cond,
                    as_null=as_null)

    o = outputs(params)
    logits = o["logits"]
    assert logits.shape == (3, 16, 25) and logits.dtype == jnp.float32
    assert len(o["feats"]) == 2 and all(f.shape == (3, 17, 32) for f in o["feats"])
    np.testing.assert_array_equal(o["emb"], table[tokens.reshape(3, 16)])
    np.testing.assert_allclose(o["via_emb"], logits, atol=1e-6)
    np.testing.assert_allclose(o["soft"], o["emb"], atol=1e-6)
    # Without drop_label the labels are used: sample 0 is unchanged, sample 1 differs.
    np.testing.assert_allclose(o["only_cond"][0], logits[0], atol=1e-5)
    assert not np.allclose(o["only_cond"][1], logits[1], atol=1e-3)
    np.testing.assert_allclose(o["as_null"][1], logits[1], atol=1e-5)

    v = {"params": params}
    with pytest.raises(ValueError, match="exactly one of"):
        model.apply(v, tokens, labels, input_embeddings=o["emb"])
    with pytest.raises(ValueError, match="expected 16 tokens"):
        model.apply(v, tokens[:, :2], labels)


def test_transformer_bf16_remat_and_dropout(tiny_vit):
    cfg = dict(TINY_VIT, depth=1)
    model = maskgit_transformer_from_cfg(cfg)
    params = _random_params(maskgit_expected_params(model), 1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 25, (2, 16)), jnp.int32)
    labels = jnp.asarray([1, 2], jnp.int32)
    remat = maskgit_transformer_from_cfg(cfg, remat=True)
    bf16 = maskgit_transformer_from_cfg(cfg, dtype=jnp.bfloat16)
    drop = maskgit_transformer_from_cfg(cfg, dropout=0.5)

    @jax.jit
    def outputs(params):
        loss = lambda m: (lambda p: jnp.mean(m.apply({"params": p}, tokens, labels) ** 2))
        return dict(
            ref=model.apply({"params": params}, tokens, labels),
            g_ref=jax.grad(loss(model))(params),
            g_remat=jax.grad(loss(remat))(params),
            bf16=bf16.apply({"params": params}, tokens, labels),
            drop_on=drop.apply({"params": params}, tokens, labels, deterministic=False,
                               rngs={"dropout": jax.random.PRNGKey(0)}),
            drop_off=drop.apply({"params": params}, tokens, labels, deterministic=True),
        )

    o = outputs(params)
    for a, b in zip(jax.tree_util.tree_leaves(o["g_ref"]), jax.tree_util.tree_leaves(o["g_remat"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(a))))
    ref = o["ref"]
    assert o["bf16"].dtype == jnp.float32
    assert np.max(np.abs(o["bf16"] - ref)) < 0.1 * np.max(np.abs(ref)) + 0.1
    np.testing.assert_allclose(o["drop_off"], ref, atol=1e-6)
    assert not np.allclose(o["drop_on"], o["drop_off"], atol=1e-3)


def test_perturb_embeddings():
    e = jnp.ones((2, 16, 8))
    np.testing.assert_array_equal(perturb_embeddings(e, 0.0, jax.random.PRNGKey(0)), e)
    key = jax.random.PRNGKey(3)
    got = perturb_embeddings(e, 0.1, key)
    want = 0.1 * jax.random.normal(key, e.shape) + np.sqrt(1 - 0.01) * e
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        perturb_embeddings(e, 1.5, key)


# --- VQGAN API --------------------------------------------------------------------------
def test_vqgan_api():
    vq = taming_vqgan_from_cfg(TINY_VQ)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)), jnp.float32)
    params = _random_params(vqgan_expected_params(vq), 2)

    @jax.jit
    def outputs(params):
        v = {"params": params}
        enc = vq.apply(v, images, method=TamingVQModel.encode)
        # Hard latents and one-hot soft latents through one decoder call.
        soft = vq.apply(v, jax.nn.one_hot(enc["indices"], 16), method=TamingVQModel.soft_latents)
        both = vq.apply(v, jnp.concatenate([enc["quantized"], soft]), method=TamingVQModel.decode_latents)
        return enc, both[:2], both[2:]

    enc, dec, soft = outputs(params)
    assert enc["h"].shape == (2, 8, 8, 8) and enc["indices"].shape == (2, 8, 8)
    cb = params["codebook"]
    # indices are the nearest codebook rows.
    d = np.sum((np.asarray(enc["h"])[..., None, :] - np.asarray(cb)) ** 2, axis=-1)
    np.testing.assert_array_equal(enc["indices"], np.argmin(d, axis=-1))
    np.testing.assert_array_equal(enc["quantized"], np.asarray(cb)[np.asarray(enc["indices"])])
    assert dec.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(soft, dec, atol=1e-5)

    with pytest.raises(ValueError, match="NCHW"):
        vq.apply({"params": params}, jnp.zeros((2, 3, 16, 16)), method=TamingVQModel.encode)


# --- samplers ---------------------------------------------------------------------------
def test_reveal_counts():
    # Hand-computed: arccos(linspace(1,0,4))/(π/2) = [0, .5355, .7837, 1] -> ·16/2.319 =
    # [0, 3.69, 5.41, 6.90] -> round [0, 4, 5, 7] -> zeros to 1 -> last absorbs: [1, 4, 5, 6].
    np.testing.assert_array_equal(ms.reveal_counts(16, 4), [1, 4, 5, 6])
    for steps in (1, 2, 8, 12, 16):
        for sched in ms.SCHEDULES:
            c = ms.reveal_counts(256, steps, sched)
            assert c.sum() == 256 and c.min() >= 1 and len(c) == steps
    c = ms.reveal_counts(256, 12, "arccos")
    assert np.all(np.diff(c[:-1]) >= 0)  # arccos reveals few tokens first
    with pytest.raises(ValueError, match="exceeds"):
        ms.reveal_counts(16, 17)
    np.testing.assert_allclose(ms.guidance_scales(5, 2.0), [1, 1.5, 2, 2.5, 3])


def test_guided_logits_formula():
    c, u = jnp.asarray([1.0, -2.0]), jnp.asarray([0.5, 1.0])
    np.testing.assert_allclose(ms.guided_logits(c, u, 3.0), u + 3.0 * (c - u), rtol=1e-6)
    np.testing.assert_array_equal(ms.guided_logits(c, u, 1.0), c)


def test_teacher_sampler_invariants(tiny_vit):
    model, params = tiny_vit
    labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
    steps = 5
    counts = ms.reveal_counts(16, steps)
    kw = dict(num_tokens=16, codebook_size=24, num_steps=steps)

    # sample_mask_token=False: the final state itself must hold no MASK (no clamp needed).
    @jax.jit
    def run(params, rng, w):
        return ms.maskgit_sample(ms.maskgit_logits_fn(model, params), rng, labels, cfg_scale=w,
                                 sample_mask_token=False, return_intermediates=True, **kw)

    ids, inter = run(params, jax.random.PRNGKey(0), 3.0)
    assert ids.shape == (4, 16) and int(ids.min()) >= 0 and int(ids.max()) < 24
    np.testing.assert_array_equal(inter["num_masked"], np.broadcast_to((16 - np.cumsum(counts))[:, None], (steps, 4)))
    # Revealed tokens are never changed afterwards, and nothing is MASK at the end.
    states = np.asarray(inter["tokens"])
    for i in range(1, steps):
        prev = states[i - 1] != 24
        np.testing.assert_array_equal(states[i][prev], states[i - 1][prev])
    np.testing.assert_array_equal(np.sum(states == 24, axis=-1), inter["num_masked"])
    assert not np.any(states[-1] == 24)
    np.testing.assert_array_equal(states[-1], ids)

    # CFG with w = 0 (traced, so the guided path runs) equals conditional-only sampling
    # (a Python 0 builds the sampler without the unconditional forward).
    ids_w0, _ = run(params, jax.random.PRNGKey(0), 0.0)
    cond_only = jax.jit(lambda p, r: ms.maskgit_sample(ms.maskgit_logits_fn(model, p), r, labels, cfg_scale=0,
                                                       sample_mask_token=False, **kw))
    np.testing.assert_array_equal(ids_w0, cond_only(params, jax.random.PRNGKey(0)))
    assert not np.array_equal(ids_w0, ids)  # guidance changes the samples


def test_samplers_on_mesh(tiny_vit):
    model, params = tiny_vit
    mesh = meshlib.make_mesh(8)
    labels = jnp.arange(8, dtype=jnp.int32) % 5
    teacher = ms.make_maskgit_teacher_sampler(model, mesh=mesh, num_steps=4)
    ids = teacher(params, jax.random.PRNGKey(0), labels)
    assert ids.shape == (8, 4, 4) and int(ids.max()) < 24
    with pytest.raises(ValueError, match="not divisible"):
        teacher(params, jax.random.PRNGKey(0), labels[:6])

    student = ms.make_maskgit_student_sampler(model, mesh=mesh)
    ids = student(params, jax.random.PRNGKey(1), labels)
    assert ids.shape == (8, 4, 4) and int(ids.min()) >= 0 and int(ids.max()) < 24


def test_initial_tokens_exact_mask_count():
    tokens = np.asarray(jax.jit(lambda k: ms.initial_tokens(k, 6, 256, 1024, 0.6))(jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(np.sum(tokens == 1024, axis=-1), np.full(6, 154))  # round(153.6)
    assert tokens.max() == 1024 and tokens.min() >= 0 and len(np.unique(tokens)) > 100
    few = jax.jit(lambda k: ms.initial_tokens(k, 2, 16, 8, 0.0))(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.sum(np.asarray(few) == 8, axis=-1), [1, 1])  # at least one each


def test_convert_cli_registry_round_trip(fixtures_dir, tmp_path):
    from softdimo_jax import convert
    from softdimo_jax.runtime import converted

    fx = load_fixture(str(fixtures_dir / "maskgit_transformer_a.npz"))
    model, params = convert.convert("maskgit_transformer", fx.path, str(tmp_path / "vit"), overrides=dict(fx.cfg))
    assert model == maskgit_transformer_from_cfg(fx.cfg)
    loaded_model, loaded = converted.load_converted(str(tmp_path / "vit"))
    assert loaded_model == model
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    from softdimo_jax.conversion.maskgit import maskgit_transformer_defaults, taming_vqgan_defaults

    assert MaskGITTransformer(**maskgit_transformer_defaults()) == maskgit_transformer_from_cfg(IMAGENET256_CFG)
    assert TamingVQModel(**converted.config_from_json(taming_vqgan_defaults())) == taming_vqgan_from_cfg(IMAGENET_F16_1024_CFG)


def test_file_loaders(fixtures_dir, tmp_path):
    import yaml

    from softdimo_jax.conversion.maskgit import load_maskgit_transformer, load_taming_vqgan, taming_vqgan_from_yaml

    fx = load_fixture(str(fixtures_dir / "taming_vqgan_a.npz"))
    cfg_path = tmp_path / "model.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel",
                                                  "params": dict(fx.cfg, lossconfig={"target": "x"})}}))
    vq = taming_vqgan_from_yaml(str(cfg_path))
    assert vq == taming_vqgan_from_cfg(fx.cfg)
    params, ignored = load_taming_vqgan(fx.path, vq, return_ignored=True)
    assert ignored == []
    np.testing.assert_array_equal(params["codebook"], fx.sd["quantize.embedding.weight"])

    fx = load_fixture(str(fixtures_dir / "maskgit_transformer_a.npz"))
    params = load_maskgit_transformer(fx.path, maskgit_transformer_from_cfg(fx.cfg))
    np.testing.assert_array_equal(params["bias"], fx.sd["bias"])
