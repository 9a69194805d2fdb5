"""Meissonic: Transformer2DModel + VQ model ports, diffusers-folder conversion, parity and the
scheduler replay (fixtures made from the original PyTorch code; see tests/fixtures/README.md)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax import convert as convert_cli
from softdimo_jax.conversion.meissonic import (
    convert_meissonic_transformer,
    convert_meissonic_vq,
    meissonic_transformer_config_from_json,
    meissonic_vq_config_from_json,
    transformer_folder,
    vq_folder,
)
from softdimo_jax.conversion.state_dict import ConversionError
from softdimo_jax.models.meissonic import MeissonicTransformer, embedding_table
from softdimo_jax.models.meissonic_vq import MeissonicVQModel
from softdimo_jax.models.soft_embed import expected_embedding
from softdimo_jax.parity import load_fixture
from softdimo_jax.parity_checks.meissonic import build_transformer, build_vq, check_transformer, check_vqvae
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.converted import load_converted
from softdimo_jax.sampling.meissonic_sampler import (dimo_initial_tokens, meissonic_generate, meissonic_one_step,
                                                     pipeline_micro_conds)


@pytest.fixture(scope="module")
def tfx(fixtures_dir):
    return load_fixture(str(fixtures_dir / "meissonic_transformer_a.npz"))


@pytest.fixture(scope="module")
def vfx(fixtures_dir):
    return load_fixture(str(fixtures_dir / "meissonic_vqvae_a.npz"))


def _failed(checks):
    return [c.line() for c in checks if not c.passed]


def test_transformer_parity_forward_cfg_perturb_and_generation_replay(tfx):
    checks = check_transformer(tfx)
    names = {c.name for c in checks}
    # Every recorded output is checked: logits, CFG, each activation, Di[M]O's call, the replay.
    assert {"logits", "cfg_logits", "dimo_perturb_logits", "gen_ids", "gen_step_mask_len",
            "gen_step_guided_logits"} <= names
    assert {k for k in tfx.outputs if k.startswith("inter/")} <= names
    assert not _failed(checks), _failed(checks)


def test_vqvae_parity(vfx):
    checks = check_vqvae(vfx)
    assert len(checks) == 7 and not _failed(checks), _failed(checks)


def _zero_stride_sd(shapes):
    # Full-size stand-ins without allocating: every entry views one float32 zero.
    zero = np.zeros((), np.float32)
    return {k: np.broadcast_to(zero, tuple(s)) for k, s in shapes["keys"].items()}


@pytest.mark.parametrize("which", ["transformer", "vqvae"])
def test_full_size_key_lists_convert_exactly(fixtures_dir, which):
    shapes = json.loads((fixtures_dir / f"meissonic_{which}_full_shapes.json").read_text())
    if which == "transformer":
        fields = meissonic_transformer_config_from_json(shapes["config"])
        model = MeissonicTransformer(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        assert model == MeissonicTransformer()  # the defaults are the released model
        params = convert_meissonic_transformer(_zero_stride_sd(shapes), model)
    else:
        fields = meissonic_vq_config_from_json(shapes["config"])
        model = MeissonicVQModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        assert model == MeissonicVQModel()
        params = convert_meissonic_vq(_zero_stride_sd(shapes), model)
    assert sum(np.size(x) for x in jax.tree.leaves(params)) == shapes["num_params"]
    # A missing key is reported by name.
    sd = _zero_stride_sd(shapes)
    dropped = sorted(sd)[0]
    del sd[dropped]
    with pytest.raises(ConversionError, match=dropped.replace(".", r"\.")):
        (convert_meissonic_transformer if which == "transformer" else convert_meissonic_vq)(sd, model)


def test_soft_path_equals_hard_path_on_one_hot(tfx, vfx):
    model = build_transformer(tfx.cfg)
    params = convert_meissonic_transformer(tfx.sd, model)
    v = {"params": params}
    i = tfx.inputs
    tokens = jnp.asarray(i["tokens"], jnp.int32)  # MASK (vocab_size - 1) at ~40%
    args = (jnp.asarray(i["encoder_hidden_states"]), jnp.asarray(i["pooled_projections"]),
            jnp.asarray(i["micro_conds"]), jnp.asarray(i["timestep"]))
    fwd = jax.jit(lambda v, t, e, noise, p: model.apply(v, t, *args, input_embeddings=e, perturb_noise=noise,
                                                        noise_emb_perturb=p))
    embed = jax.jit(lambda v, probs: model.apply(v, probs, method=MeissonicTransformer.embed_probs))
    # Two compiled programs (ids, embeddings); zero noise at p = 0 is exactly the plain path.
    zero = jnp.zeros(tokens.shape + (model.inner_dim,), jnp.float32)
    with jax.default_matmul_precision("highest"):
        hard = fwd(v, tokens, None, zero, 0.0)
        soft = fwd(v, None, embed(v, jax.nn.one_hot(tokens, model.vocab_size)), zero, 0.0)
        np.testing.assert_allclose(np.asarray(soft), np.asarray(hard), atol=1e-5)
        # Probabilities over the codes only (the generator's output) on MASK-free ids.
        codes = jnp.where(tokens == model.mask_token_id, 3, tokens)
        emb_k = embed(v, jax.nn.one_hot(codes, model.codebook_size))
        # The project's soft-embedding helper on the exported table gives the same p @ E.
        np.testing.assert_allclose(
            np.asarray(expected_embedding(jax.nn.one_hot(codes, model.codebook_size),
                                          embedding_table(params, model.codebook_size))),
            np.asarray(emb_k), atol=1e-6)
        soft_k = fwd(v, None, emb_k, zero, 0.0)
        np.testing.assert_allclose(np.asarray(soft_k), np.asarray(fwd(v, codes, None, zero, 0.0)), atol=1e-5)
        # Di[M]O's perturbation changes the logits for p > 0; entering after the embedding block
        # with that perturbed embedding (what TTEO optimises) gives the same logits.
        noise = jax.random.normal(jax.random.PRNGKey(0), zero.shape)
        moved = fwd(v, tokens, None, noise, 0.5)
        assert float(jnp.max(jnp.abs(moved - hard))) > 1e-3
        _, inter = jax.jit(lambda v: model.apply(v, tokens, *args, perturb_noise=noise, noise_emb_perturb=0.5,
                                                 return_intermediates=True))(v)
        from_embedded = jax.jit(lambda v, e: model.apply(v, None, *args, embedded=e))(v, inter["embed"])
        np.testing.assert_allclose(np.asarray(from_embedded), np.asarray(moved), atol=1e-5)

    # VQ: decode_soft and decode_tokens share decode_latents; on one-hot probabilities the soft
    # latents p @ codebook are the looked-up rows (the fixture checks decode_soft itself).
    vq = build_vq(vfx.cfg)
    vv = {"params": convert_meissonic_vq(vfx.sd, vq)}
    ids = jnp.asarray(vfx.inputs["tokens"], jnp.int32)
    hard_lat = vq.apply(vv, ids, method=MeissonicVQModel.lookup)
    soft_lat = vq.apply(vv, jax.nn.one_hot(ids, vq.num_vq_embeddings), method=MeissonicVQModel.soft_latents)
    np.testing.assert_allclose(np.asarray(soft_lat), np.asarray(hard_lat), atol=1e-6)


def test_sampler_with_rng_fills_every_position(tfx):
    model = build_transformer(tfx.cfg)
    params = convert_meissonic_transformer(tfx.sd, model)
    i = tfx.inputs
    kw = dict(grid=(8, 6), num_steps=3, guidance_scale=4.0, temperature=(2.0, 0.0))
    args = (jnp.asarray(i["gen_prompt_embeds"]), jnp.asarray(i["gen_encoder_hidden_states"]),
            jnp.asarray(i["gen_negative_prompt_embeds"]), jnp.asarray(i["gen_negative_encoder_hidden_states"]),
            pipeline_micro_conds(2))
    ids, tr = meissonic_generate(model, params, *args, rng=jax.random.PRNGKey(1), return_trace=True, **kw)
    ids = np.asarray(ids)
    assert ids.shape == (2, 8, 6) and ids.min() >= 0 and ids.max() < model.codebook_size
    # Masked counts follow the cosine schedule, floor(48·cos(π/2·(i+1)/3)) in float32 like the
    # original (cos(π/3) rounds below 0.5 there, so 23, not 24), and none are left at the end.
    masked = [(np.asarray(tr["output_ids"][s]) == model.mask_token_id).sum(axis=(1, 2)).tolist() for s in range(3)]
    assert masked == [[41, 41], [23, 23], [0, 0]]
    again, _ = meissonic_generate(model, params, *args, rng=jax.random.PRNGKey(1), return_trace=True, **kw)
    np.testing.assert_array_equal(np.asarray(again), ids)
    with pytest.raises(ValueError, match="exactly one of rng or recorded"):
        meissonic_generate(model, params, *args, **kw)
    # Di[M]O's one-step student call: round(0.5·48) = 24 masked initial tokens, perturbed embedding.
    init = np.asarray(dimo_initial_tokens(jax.random.PRNGKey(2), 2, (8, 6), model.codebook_size,
                                          model.mask_token_id, 0.5))
    assert (init == model.mask_token_id).sum(axis=(1, 2)).tolist() == [24, 24]
    ids1, logits1 = meissonic_one_step(model, params, args[0], args[1], jax.random.PRNGKey(3), grid=(8, 6),
                                       temperature=0.0)
    assert ids1.shape == (2, 8, 6) and logits1.shape == (2, 8, 6, model.codebook_size)
    np.testing.assert_array_equal(np.asarray(ids1), np.asarray(jnp.argmax(logits1, axis=-1)))


def _write_folder(path, cfg, sd, class_name):
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": class_name, **cfg}))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "diffusion_pytorch_model.safetensors"))
    return path


def test_convert_cli_reads_diffusers_folders_and_refuses_the_wrong_family(tmp_path, tfx, vfx, capsys):
    tdir = _write_folder(tmp_path / "transformer", tfx.cfg["config"], tfx.sd, "Transformer2DModel")
    vdir = _write_folder(tmp_path / "vqvae", vfx.cfg["config"], vfx.sd, "VQModel")
    # The architecture comes from config.json: no --set needed.
    assert convert_cli.main(["--model", "meissonic_transformer", str(tdir), str(tmp_path / "t_out")]) == 0
    model, params = load_converted(str(tmp_path / "t_out"))
    assert model == build_transformer(tfx.cfg)
    np.testing.assert_array_equal(params["embed_conv"]["kernel"], tfx.sd["embed.conv.weight"][:, :, 0, 0].T)
    assert convert_cli.main(["--model", "meissonic_vqvae", str(vdir), str(tmp_path / "v_out")]) == 0
    assert load_converted(str(tmp_path / "v_out"))[0] == build_vq(vfx.cfg)
    capsys.readouterr()
    # Wrong family: the VQ folder given as the transformer -> one line naming both.
    assert convert_cli.main(["--model", "meissonic_transformer", str(vdir), str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "VQModel" in err and "transformer/" in err
    with pytest.raises(ConversionError, match="describes a Transformer2DModel"):
        vq_folder(str(tdir))
    # Wrong config: config.json says 3 dual blocks, the weights hold 2 -> refused, keys named.
    bad_cfg = dict(tfx.cfg["config"], num_layers=3)
    bdir = _write_folder(tmp_path / "bad_transformer", bad_cfg, tfx.sd, "Transformer2DModel")
    fields, weights = transformer_folder(str(bdir))
    assert fields["num_layers"] == 3 and weights.endswith(".safetensors")
    assert convert_cli.main(["--model", "meissonic_transformer", str(bdir), str(tmp_path / "bad2")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 2 dual-stream and 2 single-stream blocks" in err
    # A width/vocab mismatch is named in one line too; other mismatches get the full key report.
    model = build_transformer(tfx.cfg)
    with pytest.raises(ConversionError, match=r"embed\.embeddings\.weight is \(72, 32\).*\(80, 32\)"):
        convert_meissonic_transformer(tfx.sd, model.clone(vocab_size=80))
    sd = dict(tfx.sd)
    del sd["mlm_layer.conv1.weight"]
    with pytest.raises(ConversionError, match=r"missing keys \(1\):\n    mlm_layer\.conv1\.weight"):
        convert_meissonic_transformer(sd, model)
    with pytest.raises(ConversionError, match="it looks like a diffusers VQModel"):
        convert_meissonic_transformer(vfx.sd, model)
    with pytest.raises(ConversionError, match="it looks like Meissonic's transformer"):
        convert_meissonic_vq(tfx.sd, build_vq(vfx.cfg))
    # Variants the port does not implement are refused from the config, in one line.
    with pytest.raises(ConversionError, match="mid_block_add_attention=True is not implemented"):
        meissonic_vq_config_from_json(dict(vfx.cfg["config"], mid_block_add_attention=True))


def test_forward_on_the_8_device_mesh_equals_one_device(tfx):
    model = build_transformer(tfx.cfg)
    params = convert_meissonic_transformer(tfx.sd, model)
    i = tfx.inputs
    rep = lambda x: np.concatenate([np.asarray(x)] * 3)[:8]  # 8 rows from the fixture's 3
    batch = (rep(i["tokens"]).astype(np.int32), rep(i["encoder_hidden_states"]), rep(i["pooled_projections"]),
             rep(i["micro_conds"]), rep(i["timestep"]))
    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    with jax.default_matmul_precision("highest"):
        want = fwd(params, *batch)
        mesh = meshlib.make_mesh(8)
        got = fwd(jax.device_put(params, meshlib.replicated(mesh)), *meshlib.shard_batch(batch, mesh))
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
