"""MaskBit converters: full-size key coverage, strict errors, the convert CLI, configs."""

import importlib.util
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax import convert as convert_cli
from softdimo_jax.conversion import maskbit as maskbit_conversion
from softdimo_jax.runtime import converted
from softdimo_jax import parity
from softdimo_jax.conversion.maskbit import (
    bert_expected_params,
    convert_maskbit_bert,
    convert_maskbit_tokenizer,
    tokenizer_expected_params,
)
from softdimo_jax.conversion.state_dict import ConversionError
from softdimo_jax.models.maskbit_bert import maskbit_bert_from_cfg, maskbit_bert_from_config
from softdimo_jax.models.maskbit_tokenizer import (
    lfq_losses,
    maskbit_tokenizer_from_cfg,
    maskbit_tokenizer_from_config,
)

CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "maskbit.py"


def _load_config(arg):
    spec = importlib.util.spec_from_file_location("maskbit_config", CONFIG_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _zeros_sd(shapes):
    sd = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
    # Buffers carry their real values (the converter checks them).
    for k, v in shapes.items():
        if k.endswith("bits_to_indices"):
            sd[k] = (2 ** np.arange(v[0])).astype(np.int32)
        if k.endswith("quantize.codebook"):
            n = v[1]
            sd[k] = (2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) - 1.0).astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def full_shapes(fixtures_dir):
    with open(fixtures_dir / "maskbit_full_shapes.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def full_config():
    return _load_config("14")


def test_full_size_generator_converts(full_shapes, full_config):
    shapes = full_shapes["maskbit_generator_14bit"]
    model = maskbit_bert_from_config(full_config.generator)
    expected = bert_expected_params(model)
    n_expected = _count(expected)
    n_source = int(sum(np.prod(v) for k, v in shapes.items() if k != "bits_to_indices"))
    print(f"\nfull 14-bit generator: {n_expected / 1e6:.2f}M params (state dict {n_source / 1e6:.2f}M)")
    assert n_expected == n_source
    assert 300e6 < n_expected < 310e6
    t = time.time()
    params = convert_maskbit_bert(_zeros_sd(shapes), model)
    print(f"converted in {time.time() - t:.1f}s")
    assert _count(params) == n_expected
    assert params["input_proj"]["kernel"].shape == (14, 1024)
    assert params["layer_23"]["mlp_fc1"]["kernel"].shape == (1024, 4096)


def test_full_size_tokenizer_converts(full_shapes, full_config):
    shapes = full_shapes["maskbit_tokenizer_14bit"]
    model = maskbit_tokenizer_from_config(full_config.tokenizer)
    expected = tokenizer_expected_params(model)
    n_expected = _count(expected)
    n_source = int(sum(np.prod(v) for k, v in shapes.items() if not k.startswith("quantize.")))
    print(f"\nfull 14-bit tokenizer: {n_expected / 1e6:.2f}M params")
    assert n_expected == n_source
    assert 50e6 < n_expected < 60e6
    params = convert_maskbit_tokenizer(_zeros_sd(shapes), model)
    assert _count(params) == n_expected


@pytest.fixture(scope="module")
def bert_fx(fixtures_dir):
    return parity.load_fixture(str(fixtures_dir / "maskbit_bert_a.npz"))


@pytest.fixture(scope="module")
def tok_fx(fixtures_dir):
    return parity.load_fixture(str(fixtures_dir / "maskbit_tokenizer_a.npz"))


def test_renamed_key_is_reported(bert_fx):
    model = maskbit_bert_from_cfg(bert_fx.cfg)
    sd = dict(bert_fx.sd)
    sd["last_layer.0.kernel"] = sd.pop("last_layer.0.weight")
    with pytest.raises(ConversionError) as e:
        convert_maskbit_bert(sd, model)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "last_layer.0.weight (64, 64)" in msg
    assert "unexpected keys (1)" in msg and "last_layer.0.kernel" in msg


def test_misshapen_key_is_reported(bert_fx):
    model = maskbit_bert_from_cfg(bert_fx.cfg)
    sd = dict(bert_fx.sd)
    sd["transformer.layers.1.1.net.0.weight"] = np.zeros((127, 64), np.float32)
    with pytest.raises(ConversionError, match=r"transformer\.layers\.1\.1\.net\.0\.weight: checkpoint \(127, 64\), model expects \(128, 64\)"):
        convert_maskbit_bert(sd, model)


def test_wrong_config_lists_everything(bert_fx):
    model = maskbit_bert_from_cfg({**bert_fx.cfg, "depth": 3})
    with pytest.raises(ConversionError, match=r"missing keys \(12\)"):
        convert_maskbit_bert(bert_fx.sd, model)


def test_legacy_token_emb_name_passes_parity(bert_fx):
    sd = {("token_emb." + k[len("input_proj."):] if k.startswith("input_proj.") else k): v
          for k, v in bert_fx.sd.items()}
    assert "token_emb.weight" in sd
    fx = parity.Fixture(bert_fx.path, bert_fx.model, bert_fx.cfg, sd, bert_fx.inputs, bert_fx.outputs)
    assert all(c.passed for c in parity.family_check(fx.model)(fx))


def test_ddp_prefix_is_stripped(bert_fx):
    model = maskbit_bert_from_cfg(bert_fx.cfg)
    ref = convert_maskbit_bert(bert_fx.sd, model)
    got = convert_maskbit_bert({"module." + k: v for k, v in bert_fx.sd.items()}, model)
    np.testing.assert_array_equal(got["layer_1"]["mlp_fc2"]["kernel"], ref["layer_1"]["mlp_fc2"]["kernel"])


def test_bit_buffer_is_checked(bert_fx, tok_fx):
    sd = dict(bert_fx.sd, bits_to_indices=np.array([1, 2, 8], np.int32))
    with pytest.raises(ConversionError, match="bits_to_indices"):
        convert_maskbit_bert(sd, maskbit_bert_from_cfg(bert_fx.cfg))
    sd = dict(tok_fx.sd)
    sd["quantize.codebook"] = -sd["quantize.codebook"]
    with pytest.raises(ConversionError, match="codebook"):
        convert_maskbit_tokenizer(sd, maskbit_tokenizer_from_cfg(tok_fx.cfg))


def test_tokenizer_missing_shortcut_is_reported(tok_fx):
    sd = dict(tok_fx.sd)
    del sd["decoder.up.1.res_blocks.0.nin_shortcut.weight"]
    with pytest.raises(ConversionError, match=r"decoder\.up\.1\.res_blocks\.0\.nin_shortcut\.weight"):
        convert_maskbit_tokenizer(sd, maskbit_tokenizer_from_cfg(tok_fx.cfg))


def test_prenorm_variant_needs_final_norm(bert_fx):
    model = maskbit_bert_from_cfg({**bert_fx.cfg, "use_prenorm": True})
    with pytest.raises(ConversionError, match="norm_after_transformer.weight"):
        convert_maskbit_bert(bert_fx.sd, model)
    sd = dict(bert_fx.sd)
    sd["norm_after_transformer.weight"] = np.ones(64, np.float32)
    sd["norm_after_transformer.bias"] = np.zeros(64, np.float32)
    params = convert_maskbit_bert(sd, model)
    assert "final_norm" in params


def _tiny_overrides(cfg):
    return [f"num_tokens={(cfg['img_size'] // cfg['input_stride']) ** 2}", f"hidden_dim={cfg['hidden_dim']}",
            f"depth={cfg['depth']}", f"heads={cfg['heads']}", f"mlp_dim={cfg['mlp_dim']}",
            f"num_classes={cfg['nclass']}", "dropout=0.0"]


def test_convert_cli_roundtrip(tmp_path, bert_fx, tok_fx, capsys):
    dst = tmp_path / "gen"
    argv = ["--model", "maskbit_generator", "--bits", "6"]
    for o in _tiny_overrides(bert_fx.cfg):
        argv += ["--set", o]
    assert convert_cli.main(argv + [bert_fx.path, str(dst)]) == 0
    assert "maskbit_generator" in capsys.readouterr().out
    model, params = converted.load_converted(str(dst))
    logits = model.apply({"params": params}, jnp.asarray(bert_fx.inputs["tokens"]),
                         jnp.asarray(bert_fx.inputs["labels"]),
                         drop_label_mask=jnp.asarray(bert_fx.inputs["drop_label_mask"]))
    np.testing.assert_allclose(logits, bert_fx.outputs["logits"], atol=2e-4)
    # Runtime fields may change; structural ones are refused.
    m_bf16, _ = converted.load_converted(str(dst), dtype=jnp.bfloat16, remat=True)
    assert m_bf16.dtype == jnp.bfloat16 and m_bf16.remat
    with pytest.raises(converted.ConfigMismatchError, match="mlp_dim: checkpoint 128 vs module 256"):
        converted.load_converted(str(dst), model=model.clone(mlp_dim=256))
    with pytest.raises(converted.ConfigMismatchError, match="maskbit_generator"):
        converted.load_converted(str(dst), model=maskbit_tokenizer_from_cfg(tok_fx.cfg))
    with pytest.raises(ValueError, match="may be overridden"):
        converted.load_converted(str(dst), depth=3)
    # DST exists: refused without --overwrite; a wrong config fails with the key list.
    assert convert_cli.main(argv + [bert_fx.path, str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert convert_cli.main(["--model", "maskbit_generator", "--bits", "6", bert_fx.path, str(tmp_path / "x")]) == 2
    assert "misshapen keys" in capsys.readouterr().err

    tdst = tmp_path / "tok"
    tok_argv = ["--model", "maskbit_tokenizer", "--bits", "6", "--set", "hidden_channels=32",
                "--set", "channel_mult=[1,1,2]", tok_fx.path, str(tdst)]
    assert convert_cli.main(tok_argv) == 0
    tmodel, tparams = converted.load_converted(str(tdst))
    img = tmodel.apply({"params": tparams}, jnp.asarray(tok_fx.outputs["indices"], jnp.int32),
                       method=tmodel.decode_tokens)
    np.testing.assert_allclose(np.asarray(img).transpose(0, 3, 1, 2), tok_fx.outputs["decoded"], atol=1e-4)


@pytest.mark.parametrize("arg", ["10", "12bit", "16", "18", None])
def test_config_presets(arg):
    config = _load_config(arg)
    bits = config.bits
    assert config.generator.num_bits == bits == config.tokenizer.num_bits
    assert (config.generator.hidden_dim, config.generator.depth, config.generator.heads,
            config.generator.mlp_dim, config.generator.splits, config.generator.num_tokens) == (1024, 24, 16, 4096, 2, 256)
    assert tuple(config.tokenizer.channel_mult) == (1, 1, 2, 2, 4) and config.tokenizer.hidden_channels == 128
    # The CLI defaults are the same released sizes.
    gen = maskbit_bert_from_config(config.generator)
    assert converted.module_config(gen) == {**maskbit_conversion.maskbit_generator_defaults(bits),
                                              "dtype": "float32", "remat": False}
    tok = maskbit_tokenizer_from_config(config.tokenizer)
    cli_tok = converted.FAMILIES["maskbit_tokenizer"].build(maskbit_conversion.maskbit_tokenizer_defaults(bits))
    assert tok == cli_tok
    with pytest.raises(ValueError, match="released"):
        _load_config("13")


def test_tiny_config_builds_and_runs():
    config = _load_config("tiny")
    gen = maskbit_bert_from_config(config.generator)
    tok = maskbit_tokenizer_from_config(config.tokenizer)
    s = config.image_size
    # Params from shapes (random init would compile every initializer: slow on CPU).
    fill = lambda tree: jax.tree.map(lambda x: jnp.full(x.shape, 0.01, x.dtype), tree)
    tv = fill(jax.eval_shape(tok.init, jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3))))
    x = jnp.linspace(0, 1, s * s * 3).reshape(1, s, s, 3)
    recon, enc = jax.jit(tok.apply)(tv, x)
    assert recon.shape == (1, s, s, 3)
    np.testing.assert_array_equal(np.abs(enc["bits"]), 1.0)
    # Straight-through: the reconstruction loss reaches the encoder through the sign.
    loss = lambda p: jnp.mean((tok.apply({"params": p}, x)[0] - x) ** 2)
    g = jax.jit(jax.grad(loss))(tv["params"])
    assert float(jnp.abs(g["encoder"]["conv_in"]["kernel"]).sum()) > 0
    h = s // tok.downsample_factor
    assert h * h == gen.num_tokens
    tokens = jax.vmap(lambda i: jnp.stack([i & 7, i >> 3], -1))(enc["indices"].reshape(1, -1))
    gv = fill(jax.eval_shape(gen.init, jax.random.PRNGKey(1), tokens, jnp.zeros((1,), jnp.int32)))
    assert jax.jit(gen.apply)(gv, tokens, jnp.zeros((1,), jnp.int32)).shape == (1, 16, 2, 8)


def _np_lfq_losses(z, cc, w, t, g):
    bits = z.shape[-1]
    hard = np.where(z > 0, 1.0, -1.0)
    commit = cc * np.mean((hard - z) ** 2)
    cb = 2.0 * ((np.arange(2**bits)[:, None] >> np.arange(bits)) & 1) - 1.0
    aff = (2 * z.reshape(-1, bits) @ cb.T) / t
    p = np.exp(aff - aff.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ps = -np.mean(np.sum(p * np.log(np.maximum(p, 1e-5)), -1))
    ap = p.mean(0)
    ae = -np.sum(ap * np.log(np.maximum(ap, 1e-5))) * g
    return commit, ps, ae, commit + w * (ps - ae)


def test_lfq_losses_match_reference_and_straight_through():
    z = np.random.RandomState(0).randn(2, 3, 3, 5).astype(np.float32) * 0.05
    losses = jax.jit(lambda z: lfq_losses(z, 0.25, 0.02, 0.01, 1.0))
    out = losses(jnp.asarray(z))
    commit, ps, ae, total = _np_lfq_losses(z.astype(np.float64), 0.25, 0.02, 0.01, 1.0)
    np.testing.assert_allclose(out["commitment_loss"], commit, rtol=1e-5)
    np.testing.assert_allclose(out["per_sample_entropy"], ps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["avg_entropy"], ae, rtol=1e-4)
    np.testing.assert_allclose(out["quantizer_loss"], total, rtol=1e-4, atol=1e-6)
    grad = jax.jit(jax.grad(lambda z: losses(z)["quantizer_loss"]))(jnp.asarray(z))
    assert jnp.isfinite(grad).all() and float(jnp.abs(grad).sum()) > 0


def test_convert_cli_from_real_torch_bin(tmp_path):
    """A torch.save .bin (float16, legacy token_emb names) -> CLI -> load_converted ->
    the logits of the matching fixture."""
    data = pathlib.Path(__file__).parent / "data"
    fx = parity.load_fixture(str(data / "maskbit_bert_prenorm_s1.npz"))
    cfg = fx.cfg
    argv = ["--model", "maskbit_generator", "--bits", "5", "--set", "splits=1", "--set", "use_prenorm=true"]
    for o in _tiny_overrides(cfg):
        argv += ["--set", o]
    assert convert_cli.main(argv + [str(data / "maskbit_bert_prenorm_s1.bin"), str(tmp_path / "g")]) == 0
    model, params = converted.load_converted(str(tmp_path / "g"))
    assert model.use_prenorm and model.splits == 1
    with jax.default_matmul_precision("float32"):
        logits = jax.jit(lambda p, t, y, m: model.apply({"params": p}, t, y, drop_label_mask=m))(
            params, jnp.asarray(fx.inputs["tokens"], jnp.int32), jnp.asarray(fx.inputs["labels"], jnp.int32),
            jnp.asarray(fx.inputs["drop_label_mask"]))
    np.testing.assert_allclose(logits, fx.outputs["logits"], atol=2e-4)
