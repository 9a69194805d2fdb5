"""MaskGen family: MaskGen-VQ (MM-DiT), TA-TiTok, OpenCLIP text tower, BPE tokenizer,
converters and MaskGen's sampler."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax import parity
from softdimo_jax.conversion.state_dict import ConversionError


def _run(path):
    checks = parity.run_fixture(str(path))
    bad = [c.line() for c in checks if not c.passed]
    assert checks and not bad, "\n".join(bad)
    return {c.name for c in checks}


# ---------------------------------------------------------------------------- MaskGen-VQ
def test_maskgen_vq_fixture_parity(fixtures_dir):
    names = _run(fixtures_dir / "maskgen_vq_a.npz")
    assert {"logits", "cfg_logits", "gen_ids", "gen_step_logits"} <= names


# ---------------------------------------------------------------------- OpenCLIP text + BPE
def test_clip_text_fixture_parity(fixtures_dir):
    names = _run(fixtures_dir / "maskgen_clip_text_a.npz")
    assert {"penultimate", "pooled", "text_guidance", "pre_condition", "tokenizer_ids"} <= names


def test_bpe_tokenizer_known_ids_and_truncation(fixtures_dir):
    from softdimo_jax.data.clip_bpe import ClipBPETokenizer

    tok = ClipBPETokenizer(str(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz"))
    assert tok.vocab_size == 49408 and (tok.sot_id, tok.eot_id) == (49406, 49407)
    ids = tok.tokenize(["a photo of a cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert (ids[0, 7:] == 0).all() and list(ids[1, :3]) == [49406, 49407, 0]
    long = tok.tokenize("word " * 200)[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long != 0).all()
    # Cleaning: case, repeated whitespace and HTML entities do not change the ids.
    np.testing.assert_array_equal(tok.tokenize("A  Photo of&#32;a CAT"), tok.tokenize("a photo of a cat"))
    assert tok.decode(tok.encode("Hello, world")).strip() == "hello , world"


def test_bpe_tokenizer_missing_file_is_a_clear_error(tmp_path, monkeypatch):
    from softdimo_jax.data.clip_bpe import ClipBPETokenizer

    with pytest.raises(FileNotFoundError, match="merges file"):
        ClipBPETokenizer(str(tmp_path / "nope.txt.gz"))


def test_generation_condition_comes_from_the_clip_fixture(fixtures_dir):
    """maskgen_vq_a's gen_* conditions are the clip_text_a tower's outputs on gen_clip_ids."""
    from softdimo_jax.conversion.maskgen import convert_clip_text
    from softdimo_jax.models.clip_text import clip_text_from_cfg

    clip = parity.load_fixture(str(fixtures_dir / "maskgen_clip_text_a.npz"))
    gen = parity.load_fixture(str(fixtures_dir / "maskgen_vq_a.npz"))
    model = clip_text_from_cfg(clip.cfg)
    params = convert_clip_text(clip.sd, model)
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, jnp.asarray(gen.inputs["gen_clip_ids"]))
    np.testing.assert_allclose(out.penultimate[:-1], gen.inputs["gen_condition"], atol=2e-4)
    np.testing.assert_allclose(out.pooled[:-1], gen.inputs["gen_condition_pooled"], atol=2e-4)
    np.testing.assert_allclose(out.penultimate[-1:], gen.inputs["gen_none_condition"], atol=2e-4)
    np.testing.assert_allclose(out.pooled[-1:], gen.inputs["gen_none_condition_pooled"], atol=2e-4)


# ------------------------------------------------------------------------------- TA-TiTok
def test_tatitok_fixture_parity(fixtures_dir):
    names = _run(fixtures_dir / "tatitok_a.npz")
    assert {"encoder_z", "indices", "reconstructed", "decoded", "soft_latents", "decoded_soft"} <= names


def test_tatitok_soft_decode_of_one_hot_equals_token_decode(fixtures_dir):
    from softdimo_jax.conversion.maskgen import convert_tatitok
    from softdimo_jax.models.tatitok import TATiTok, tatitok_from_cfg

    fx = parity.load_fixture(str(fixtures_dir / "tatitok_a.npz"))
    model = tatitok_from_cfg(fx.cfg)
    v = {"params": convert_tatitok(fx.sd, model)}
    ids = jnp.asarray(fx.inputs["tokens"], jnp.int32)
    text = jnp.asarray(fx.inputs["text_guidance"])

    @jax.jit
    def run(v, ids, text, probs):
        hard = model.apply(v, ids, text, method=TATiTok.decode_tokens)
        soft = model.apply(v, jax.nn.one_hot(ids, model.codebook_size), text, method=TATiTok.decode_soft)
        grad = jax.grad(lambda p: model.apply(v, p, text, method=TATiTok.decode_soft).sum())(probs)
        return hard, soft, grad

    hard, soft, grad = run(v, ids, text, jnp.asarray(fx.inputs["soft_probs"]))
    assert hard.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(soft, hard, atol=1e-5)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(v, jnp.zeros((1, 3, 32, 32)), text[:1])


# ------------------------------------------------------------------- conversion, full size
def _zeros_sd(shapes):
    # np.zeros maps untouched zero pages: the sources cost no memory until read.
    return {k: np.zeros(tuple(s), np.float32) for k, s in shapes.items()}


def _count(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("which", ["maskgen_vq_l", "tatitok_bl128_vq", "openclip_vit_l_14_336_text"])
def test_full_size_state_dicts_convert_strictly(fixtures_dir, which):
    """Every key and shape of the released checkpoints maps onto the full-size modules."""
    import gc

    from softdimo_jax.conversion import maskgen as conv
    from softdimo_jax.models.clip_text import ClipTextTransformer
    from softdimo_jax.models.maskgen import MaskGenVQ
    from softdimo_jax.models.tatitok import TATiTok

    shapes = json.load(open(fixtures_dir / "maskgen_full_shapes.json"))[which]
    counts = json.load(open(fixtures_dir / "maskgen_full_param_counts.json"))[which]
    if which == "maskgen_vq_l":
        model, fn = MaskGenVQ(**conv.maskgen_vq_defaults()), conv.convert_maskgen_vq
    elif which == "tatitok_bl128_vq":
        model, fn = TATiTok(**conv.tatitok_defaults()), conv.convert_tatitok
    else:
        model, fn = ClipTextTransformer(**conv.clip_text_defaults()), conv.convert_clip_text
    sd = _zeros_sd(shapes)
    params = fn(sd, model)  # raises on any missing / unexpected / misshapen key
    n = _count(params)
    del params, sd
    gc.collect()
    # logit_scale (1 element) is not a parameter of the text tower; lm_head is tied.
    assert n == counts["unique_parameters"] - (1 if which.startswith("openclip") else 0)


# --------------------------------------------------------------------- conversion, errors
@pytest.fixture(scope="module")
def maskgen_fx(fixtures_dir):
    from softdimo_jax.conversion.maskgen import convert_maskgen_vq
    from softdimo_jax.models.maskgen import maskgen_vq_from_cfg

    fx = parity.load_fixture(str(fixtures_dir / "maskgen_vq_a.npz"))
    model = maskgen_vq_from_cfg(fx.cfg)
    return fx, model, convert_maskgen_vq(fx.sd, model)


def test_maskgen_converter_tied_head_and_errors(maskgen_fx):
    from softdimo_jax.conversion.maskgen import convert_maskgen_vq

    fx, model, params = maskgen_fx
    sd = dict(fx.sd)
    del sd["lm_head.weight"]  # tied: may be missing from a saved file
    p2 = convert_maskgen_vq(sd, model)
    np.testing.assert_array_equal(p2["embeddings"]["embedding"], params["embeddings"]["embedding"])

    untied = dict(fx.sd, **{"lm_head.weight": fx.sd["lm_head.weight"] + 1})
    with pytest.raises(ConversionError, match="weight_tying=False"):
        convert_maskgen_vq(untied, model)

    bad = dict(fx.sd)
    del bad["blocks.0.attn.to_q.bias"]
    bad["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    bad["pos_embed"] = np.zeros((1, 8, 64), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_maskgen_vq(bad, model)
    msg = str(e.value)
    assert "blocks.0.attn.to_q.bias" in msg and "blocks.0.attn.extra.weight" in msg and "pos_embed" in msg


# ------------------------------------------------------------------ MaskGen-VQ extras
def test_maskgen_soft_embeddings_features_and_dtypes(maskgen_fx):
    from softdimo_jax.models.maskgen import MaskGenVQ, embedding_table

    fx, model, params = maskgen_fx
    v = {"params": params}
    i = fx.inputs
    tokens = jnp.asarray(i["tokens"], jnp.int32)
    args = (jnp.asarray(i["condition"]), jnp.asarray(i["condition_pooled"]), jnp.asarray(i["aesthetic_score"]))

    @jax.jit
    def hard_and_soft(v, tokens, args):
        logits, feats = model.apply(v, tokens, *args, return_features=True)
        emb = model.apply(v, tokens, method=MaskGenVQ.embed_tokens)
        # One-hot probabilities over K codes + MASK reproduce the hard token embeddings.
        probs = jax.nn.one_hot(tokens, model.codebook_size + 1)
        soft = model.apply(v, probs, method=MaskGenVQ.embed_probs)
        from_emb = lambda e: model.apply(v, None, *args, input_embeddings=e)
        grad = jax.grad(lambda p: from_emb(model.apply(v, p, method=MaskGenVQ.embed_probs)).std())(probs)
        return logits, feats, emb, soft, from_emb(emb), grad

    with jax.default_matmul_precision("highest"):
        logits, feats, emb, soft, logits_emb, grad = hard_and_soft(v, tokens, args)
    assert len(feats) == model.depth and feats[-1].shape == (3, 16, 64)
    np.testing.assert_allclose(soft, emb, atol=1e-6)
    np.testing.assert_allclose(logits_emb, logits, atol=1e-5)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    table = model.apply(v, method=MaskGenVQ.embedding_table)
    assert table.shape == (32, 64)
    np.testing.assert_array_equal(table, embedding_table(params, 32))

    remat = MaskGenVQ(**{**_fields(model), "remat": True})
    np.testing.assert_allclose(jax.jit(remat.apply)(v, tokens, *args), logits, atol=1e-4)
    bf16 = MaskGenVQ(**{**_fields(model), "dtype": jnp.bfloat16})
    out = jax.jit(bf16.apply)(v, tokens, *args)
    assert out.dtype == jnp.float32 and np.abs(out - logits).max() < 0.15
    with pytest.raises(ValueError, match="aesthetic_score"):
        model.apply(v, tokens, *args[:2])
    with pytest.raises(ValueError, match="exactly one"):
        model.apply(v, None, *args)


def _fields(model):
    import dataclasses

    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}


# ---------------------------------------------------------------------------- sampling
def test_schedule_values():
    from softdimo_jax.sampling.maskgen_sampler import maskgen_schedule

    s = maskgen_schedule(16, 128, guidance_scale=12.0, randomize_temperature=2.0)
    assert s.cfg_scale[-1] == pytest.approx(12.0) and s.cfg_scale[0] == pytest.approx(1 + 11 * (1 - np.cos(np.pi / 16)) / 2)
    assert np.all(np.diff(s.cfg_scale) > 0)  # cosine growth from ~1 to the full scale
    assert s.softmax_temperature[-1] == pytest.approx(0.5) and s.gumbel_temperature[-1] == 0
    assert s.mask_len[-1] == 0 and np.all(np.diff(s.mask_len) <= 0)


def test_generate_with_null_condition_guidance_and_noise(maskgen_fx):
    from softdimo_jax.models.maskgen import guided_logits
    from softdimo_jax.sampling.maskgen_sampler import maskgen_generate, maskgen_one_step

    fx, model, params = maskgen_fx
    i = fx.inputs
    cond, pooled = jnp.asarray(i["gen_condition"]), jnp.asarray(i["gen_condition_pooled"])
    nc, npool = jnp.asarray(i["gen_none_condition"]), jnp.asarray(i["gen_none_condition_pooled"])
    kw = dict(num_steps=4, guidance_scale=4.0, randomize_temperature=1.5, return_trace=True)
    a, tr = maskgen_generate(model, params, cond, pooled, nc, npool, jax.random.PRNGKey(1), 6.5, **kw)
    b, _ = maskgen_generate(model, params, cond, pooled, nc, npool, jax.random.PRNGKey(1), 6.5, **kw)
    c, _ = maskgen_generate(model, params, cond, pooled, nc, npool, jax.random.PRNGKey(2), 6.5, **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 16) and (np.asarray(a) < model.codebook_size).all() and (a != c).any()
    # The second half of the guided batch runs on the null (empty-caption) condition.
    ids0 = tr["input_ids"][1, :2]
    v = {"params": params}
    fwd = jax.jit(model.apply)
    un = fwd(v, ids0, jnp.broadcast_to(nc, cond.shape), jnp.broadcast_to(npool, pooled.shape), 6.5)
    co = fwd(v, ids0, cond, pooled, 6.5)
    np.testing.assert_allclose(tr["logits"][1, 2:], un, atol=1e-4)
    np.testing.assert_allclose(tr["logits"][1, :2], co, atol=1e-4)
    # Each step fixes more tokens (the masked count shrinks to 0).
    n_masked = (np.asarray(tr["input_ids"][:, :2]) == model.mask_token_id).sum(-1)
    assert (n_masked[0] == 16).all() and np.all(np.diff(n_masked, axis=0) < 0)
    assert np.abs(guided_logits(co, un, 0.0) - co).max() == 0

    ids, logits = maskgen_one_step(model, params, cond, pooled, jax.random.PRNGKey(0), 6.5)
    assert ids.shape == (2, 16) and logits.shape == (2, 16, 32) and (np.asarray(ids) < 32).all()


# ------------------------------------------------------------------ other configurations
def test_maskgen_variant_configs_convert_and_run(maskgen_fx):
    """No micro-condition, untied head, one block (which is then the context_pre_only one)."""
    from softdimo_jax.conversion.maskgen import convert_maskgen_vq
    from softdimo_jax.models.maskgen import maskgen_vq_from_cfg

    fx, _, _ = maskgen_fx
    cfg = json.loads(json.dumps(fx.cfg))
    cfg["model"]["maskgen"].update(micro_condition=False, weight_tying=False, decoder_depth=1)
    model = maskgen_vq_from_cfg(cfg)
    tw = cfg["model"]["vq_model"]["text_embed_dim"]
    sd = {k: v for k, v in fx.sd.items() if not k.startswith(("blocks.0.", "lm_head"))}
    sd = {k.replace("blocks.1.", "blocks.0."): v for k, v in sd.items()}
    sd["cond_pooled_proj.weight"] = fx.sd["cond_pooled_proj.weight"][:, :tw]
    sd["lm_head.weight"] = fx.sd["embeddings.weight"][:32]
    sd["lm_head.bias"] = np.zeros(32, np.float32)
    params = convert_maskgen_vq(sd, model)
    i = fx.inputs
    out = jax.eval_shape(model.apply, {"params": params}, jnp.asarray(i["tokens"]), i["condition"],
                         i["condition_pooled"])
    assert out.shape == (3, 16, 32)


def test_tatitok_and_clip_variant_configs_build():
    from softdimo_jax.models.clip_text import ClipTextTransformer
    from softdimo_jax.models.tatitok import tatitok_from_cfg

    cfg = {"model": {"vq_model": {
        "quantize_mode": "vq", "codebook_size": 16, "token_size": 8, "use_l2_norm": True,
        "vit_enc_model_size": "fixture_enc", "vit_dec_model_size": "tiny", "vit_enc_patch_size": 8,
        "vit_dec_patch_size": 16, "num_latent_tokens": 4, "finetune_decoder": False, "is_legacy": False,
        "text_context_length": 7, "text_embed_dim": 12}},
        "dataset": {"preprocessing": {"crop_size": 32}},
        "fixture_sizes": {"enc": {"width": 16, "layers": 1, "heads": 2},
                          "tiny": {"width": 24, "layers": 1, "heads": 3}}}
    model = tatitok_from_cfg(cfg)
    images, text = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 7, 12))
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, text)
    assert variables["params"]["decoder"]["ffn"]["kernel"].shape == (24, 16 * 16 * 3)
    rec, enc = jax.eval_shape(model.apply, variables, images, text)
    assert rec.shape == (2, 32, 32, 3) and enc["indices"].shape == (2, 4)
    with pytest.raises(ValueError, match="unknown ViT"):
        tatitok_from_cfg({**cfg, "fixture_sizes": {}})
    with pytest.raises(NotImplementedError, match="legacy"):
        tatitok_from_cfg({**cfg, "model": {"vq_model": {**cfg["model"]["vq_model"], "is_legacy": True}}})

    clip = ClipTextTransformer(vocab_size=50, context_length=9, width=16, heads=2, layers=1, embed_dim=8,
                               quick_gelu=False, pool_type="eos", eos_id=49)
    ids = jnp.zeros((2, 9), jnp.int32)
    v = jax.eval_shape(clip.init, jax.random.PRNGKey(0), ids)
    out = jax.eval_shape(clip.apply, v, ids)
    assert out.penultimate.shape == (2, 9, 16) and out.pooled.shape == (2, 1, 8)


def test_encode_captions_and_convert_registry(fixtures_dir, tmp_path):
    from softdimo_jax.conversion.maskgen import convert_clip_text
    from softdimo_jax.data.clip_bpe import ClipBPETokenizer
    from softdimo_jax.models.clip_text import clip_text_from_cfg
    from softdimo_jax.sampling.maskgen_sampler import encode_captions

    fx = parity.load_fixture(str(fixtures_dir / "maskgen_clip_text_a.npz"))
    model = clip_text_from_cfg(fx.cfg)
    params = convert_clip_text(fx.sd, model)
    tok = ClipBPETokenizer(str(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz"))
    # The fixture's tower has a 100-word vocabulary: fold the real ids into it.
    small = type("Tok", (), {"tokenize": lambda self, c: tok.tokenize(c) % 100})()
    cc = encode_captions(model, params, small, ["a red bird", "a cat"])
    assert cc.condition.shape == (2, 77, 48) and cc.null_condition.shape == (1, 77, 48)
    assert cc.condition_pooled.shape == (2, 1, 48) and cc.text_guidance.shape == (2, 77, 48)

    # The tiny fixtures fit together (48-wide text, 16 tokens of 32 codes): captions -> images.
    from softdimo_jax.conversion.maskgen import convert_maskgen_vq, convert_tatitok
    from softdimo_jax.models.maskgen import maskgen_vq_from_cfg
    from softdimo_jax.models.tatitok import tatitok_from_cfg
    from softdimo_jax.sampling.maskgen_sampler import one_step_images

    mfx = parity.load_fixture(str(fixtures_dir / "maskgen_vq_a.npz"))
    tfx = parity.load_fixture(str(fixtures_dir / "tatitok_a.npz"))
    mg, tt = maskgen_vq_from_cfg(mfx.cfg), tatitok_from_cfg(tfx.cfg)
    mp, tp = convert_maskgen_vq(mfx.sd, mg), convert_tatitok(tfx.sd, tt)
    for soft in (False, True):
        images, ids = one_step_images(mg, mp, tt, tp, cc, jax.random.PRNGKey(0), 6.5, soft=soft)
        assert images.shape == (2, 32, 32, 3) and ids.shape == (2, 16)
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0 and np.isfinite(images).all()

    from softdimo_jax import convert
    from softdimo_jax.runtime import converted

    over = dict(vocab_size=100, width=48, heads=4, layers=3, embed_dim=48, eos_id=99)
    convert.convert("clip_text", str(fixtures_dir / "maskgen_clip_text_a.npz"), str(tmp_path / "c"), overrides=over)
    m2, p2 = converted.load_converted(str(tmp_path / "c"))
    np.testing.assert_array_equal(p2["text_projection"], params["text_projection"])
    assert m2 == model
