"""ImageReward (family `blip`): the port against the fixture made from the original, strict
conversion of the full-size key list, refusals of other checkpoints."""

import json

import jax
import numpy as np
import pytest

from softdimo_jax import parity
from softdimo_jax.conversion.blip import UNUSED_KEYS, convert_image_reward, image_reward_defaults
from softdimo_jax.conversion.state_dict import ConversionError
from softdimo_jax.models.blip import ImageReward, image_reward_from_cfg


@pytest.fixture(scope="module")
def blip_fx(fixtures_dir):
    return parity.load_fixture(str(fixtures_dir / "reward_blip_a.npz"))


def _count(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def test_parity_fixture_all_outputs(blip_fx):
    checks = parity.family_check(blip_fx.model)(blip_fx)
    names = {c.name for c in checks}
    assert {"image_embeds", "text_last_hidden_state", "text_cls_feature", "mlp_raw", "reward"} <= names
    bad = [c.line() for c in checks if not c.passed]
    assert not bad, "\n".join(bad)


def test_full_size_key_list_converts_strictly(fixtures_dir):
    """Every key of ImageReward v1.0 (446.7M) maps onto the default module; zero-stride views,
    so nothing of that size is allocated."""
    spec = json.load(open(fixtures_dir / "reward_imagereward_full_shapes.json"))
    sd = {k: np.broadcast_to(np.zeros((), np.int64 if k.endswith("position_ids") else np.float32), tuple(s))
          for k, s in spec["keys"].items()}
    model = ImageReward(**image_reward_defaults())
    params = convert_image_reward(sd, model)  # raises on any missing / unexpected / misshapen key
    unused = sum(int(np.prod(spec["keys"][k])) for k in UNUSED_KEYS if not k.endswith("position_ids"))
    assert _count(params) == spec["num_params"] - unused


def test_unused_keys_are_exactly_the_documented_ones(blip_fx):
    model = image_reward_from_cfg(blip_fx.cfg)
    sd = dict(blip_fx.sd)
    # The position_ids buffer may be absent (newer saves); the projections too.
    for k in UNUSED_KEYS:
        sd.pop(k)
    convert_image_reward(sd, model)
    # Anything else is refused, listed by name.
    with pytest.raises(ConversionError, match="text_decoder.cls.predictions.bias"):
        convert_image_reward({**blip_fx.sd, "blip.text_decoder.cls.predictions.bias": np.zeros(3)}, model)
    missing = dict(blip_fx.sd)
    missing.pop("blip.text_encoder.encoder.layer.1.crossattention.self.value.weight")
    with pytest.raises(ConversionError, match="(?s)missing keys.*layer.1.crossattention.self.value.weight"):
        convert_image_reward(missing, model)
    # A med_config whose sizes differ from the file's: misshapen keys, not a silent load.
    with pytest.raises(ConversionError, match="misshapen"):
        convert_image_reward(blip_fx.sd, image_reward_from_cfg(blip_fx.cfg, text_intermediate=96))


@pytest.mark.parametrize("key,fix", [
    ("visual.transformer.resblocks.0.attn.in_proj_weight", "--model openclip"),
    ("vision_model.encoder.layers.0.self_attn.q_proj.weight", "--model hfclip"),
    ("visual_encoder.blocks.0.attn.qkv.weight", "ImageReward.pt"),
    ("transformer.layers.0.weight", "ImageReward.pt"),
])
def test_other_family_checkpoint_is_one_line_error(blip_fx, key, fix):
    model = image_reward_from_cfg(blip_fx.cfg)
    with pytest.raises(ConversionError) as e:
        convert_image_reward({key: np.zeros((2, 2), np.float32)}, model)
    msg = str(e.value)
    assert "\n" not in msg and "not an ImageReward checkpoint" in msg and fix in msg


def test_reward_is_normalised_raw_score_and_sizes_are_general(blip_fx):
    """Other sizes build and run (not tuned to the fixture): reward = (raw − mean)/std."""
    model = ImageReward(image_size=48, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2,
                        vision_mlp_ratio=2.0, vocab_size=20, text_hidden=24, text_layers=3, text_heads=3,
                        text_intermediate=40, max_position_embeddings=12, mlp_dims=(16, 8, 4, 2, 1),
                        reward_mean=0.5, reward_std=2.0)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 48, 48, 3))
    ids = np.array([[1, 5, 6, 2, 0], [1, 2, 0, 0, 0]])
    mask = (np.arange(5)[None] < np.array([[4], [2]])).astype(np.int32)
    v = {"params": _random_params(model, 1)}
    fwd = jax.jit(model.apply)
    out = fwd(v, images, ids, mask)
    assert out.image_embeds.shape == (2, 1 + 36, 32)
    assert out.text_last_hidden_state.shape == (2, 5, 24)
    np.testing.assert_allclose(out.reward, (out.mlp_raw - 0.5) / 2.0, rtol=1e-6)
    # Padded positions do not change the [CLS] feature (the -10000 bias makes them ~0 weight).
    out2 = fwd(v, images, np.where(mask > 0, ids, 7), mask)
    np.testing.assert_allclose(out2.text_cls_feature, out.text_cls_feature, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the text encoder's 12 positions"):
        fwd(v, images, np.ones((2, 13), np.int32), np.ones((2, 13), np.int32))
    with pytest.raises(ValueError, match=r"\(B, 48, 48, 3\)"):
        fwd(v, images[:, :40], ids, mask)


# --------------------------------------------------------------------------- the reward entry
def _tiny():
    model = ImageReward(image_size=16, patch_size=8, vision_width=16, vision_depth=1, vision_heads=2,
                        vocab_size=40, text_hidden=16, text_layers=1, text_heads=2, text_intermediate=32,
                        max_position_embeddings=35, mlp_dims=(32, 8, 4, 2, 1))
    ids = np.zeros((2, 35), np.int32)
    ids[0, :5], ids[1, :2] = [2, 7, 8, 9, 3], [2, 3]
    mask = (ids != 0).astype(np.int32)
    return model, _random_params(model), ids, mask


def _random_params(model, seed=0):
    # From the shape tree (tracing only): cheaper than compiling model.init on a busy CPU.
    from softdimo_jax.models.blip import image_reward_expected_params

    rng = np.random.default_rng(seed)
    shapes = image_reward_expected_params(model)
    return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def test_image_reward_gradient_matches_finite_differences():
    import jax.numpy as jnp

    from softdimo_jax.core.image_reward import image_reward

    model, params, ids, mask = _tiny()
    # Any input size: 20x24 images are resized (shorter side 16) and centre-cropped inside.
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 20, 24, 3), minval=0.1, maxval=0.9)
    direction = jax.random.normal(jax.random.PRNGKey(2), images.shape)
    with jax.default_matmul_precision("highest"):
        f = jax.jit(lambda x: jnp.sum(image_reward(model, params, x, ids, mask)))
        grad = jax.jit(jax.grad(f))(images)
        assert grad.shape == images.shape and bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0
        eps = 1e-2
        fd = (f(images + eps * direction) - f(images - eps * direction)) / (2 * eps)
    analytic = float(jnp.sum(grad * direction))
    assert abs(float(fd) - analytic) <= 2e-2 * abs(analytic) + 1e-4, (float(fd), analytic)


def test_image_reward_registry_entry_and_refusals(blip_fx):
    import jax.numpy as jnp

    from softdimo_jax.core.image_reward import (ImageRewardInputError, check_prompt_ids, image_reward,
                                               prompt_tokens)
    from softdimo_jax.core.reward import available_rewards, build_reward, build_reward_set

    model, params, ids, mask = _tiny()
    assert "image_reward" in available_rewards()
    rset = build_reward_set({"image_reward": 1.0}, image_reward_model=model, image_reward_params=params)
    images = jax.random.uniform(jax.random.PRNGKey(3), (2, 16, 16, 3))
    total, parts = jax.jit(rset.total)(rset.params, images, {"input_ids": ids, "attention_mask": mask})
    want = jax.jit(image_reward, static_argnums=0)(model, params, images, ids, mask)
    np.testing.assert_allclose(total, want, rtol=1e-5)
    assert parts["image_reward"].shape == (2,)
    # The condition may also be the (ids, mask) tuple, or nested under "image_reward".
    for cond in ((ids, mask), {"image_reward": {"input_ids": ids, "attention_mask": mask}, "clip": None}):
        assert [np.asarray(a).tolist() for a in prompt_tokens(cond)] == [ids.tolist(), mask.tolist()]
    with pytest.raises(ValueError, match="needs 'input_ids' and 'attention_mask'"):
        prompt_tokens({"ids": ids})
    # Another family's params (the fixture is a different size; a CLIP-like tree is not ImageReward).
    for bad in ({"visual": {"proj": jnp.zeros((2, 2))}}, convert_image_reward(blip_fx.sd, image_reward_from_cfg(blip_fx.cfg))):
        with pytest.raises(ImageRewardInputError) as e:
            build_reward("image_reward", image_reward_model=model, image_reward_params=bad)
        assert "\n" not in str(e.value) and " — " in str(e.value)
    check_prompt_ids(model, ids, mask)
    with pytest.raises(ImageRewardInputError, match="outside ImageReward's vocabulary of 40 — tokenize"):
        check_prompt_ids(model, ids + 39, mask)
    with pytest.raises(ImageRewardInputError, match="exceed ImageReward's 35 positions"):
        check_prompt_ids(model, np.ones((2, 36), np.int32), np.ones((2, 36), np.int32))
    with pytest.raises(ImageRewardInputError, match="needs the ImageReward model"):
        build_reward("image_reward", image_reward_model=object(), image_reward_params=params)
    with pytest.raises(ImageRewardInputError, match="--model blip"):
        build_reward("image_reward")


def test_long_prompt_is_truncated_as_imagereward(tmp_path):
    """ImageReward tokenizes with truncation=True, max_length=35: a 60-word prompt scores as its
    first 33 pieces + [SEP]; words past the cut do not change the reward."""
    from softdimo_jax.core.image_reward import image_reward
    from softdimo_jax.data.wordpiece import WordPieceTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog"]) + "\n")
    tok = WordPieceTokenizer(str(vocab))
    model, params, _, _ = _tiny()
    ids1, mask1 = tok("a red cat " * 20)
    ids2, mask2 = tok("a red cat " * 11 + "dog " * 30)
    assert ids1.shape == (1, 35) and mask1.all() and (ids1 == ids2).all()
    images = jax.random.uniform(jax.random.PRNGKey(4), (1, 16, 16, 3))
    f = jax.jit(image_reward, static_argnums=0)
    np.testing.assert_array_equal(f(model, params, images, ids1, mask1), f(model, params, images, ids2, mask2))


def test_convert_cli_family_blip_round_trip(blip_fx, tmp_path):
    """`python -m softdimo_jax.convert --model blip` on the fixture's weights (other sizes via
    --set), then load_converted gives the same module and params."""
    from softdimo_jax import convert
    from softdimo_jax.runtime.converted import load_converted, module_config

    model = image_reward_from_cfg(blip_fx.cfg)
    # compact JSON values: the CLI splits --set items on spaces
    sets = [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in module_config(model).items()
            if k not in ("dtype", "remat")]
    dst = tmp_path / "imagereward"
    argv = ["--model", "blip", *sum((["--set", s] for s in sets), []), blip_fx.path, str(dst)]
    assert convert.main(argv) == 0
    loaded, params = load_converted(str(dst))
    assert loaded == model
    want = convert_image_reward(blip_fx.sd, model)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    # An OpenCLIP-looking file is refused by the CLI with the one-line hint.
    bad = tmp_path / "clip.npz"
    np.savez(bad, **{"visual.transformer.resblocks.0.attn.in_proj_weight": np.zeros((6, 2), np.float32)})
    assert convert.main(["--model", "blip", str(bad), str(tmp_path / "x")]) != 0


def test_image_reward_on_the_8_device_mesh():
    """Frozen params as a replicated, non-donated jit argument; images and prompts sharded over
    the batch: the same rewards as one device."""
    from softdimo_jax.core.image_reward import image_reward
    from softdimo_jax.runtime.mesh import make_mesh, replicated, shard_batch

    model, params, ids, mask = _tiny()
    mesh = make_mesh()
    n = mesh.size
    images = jax.random.uniform(jax.random.PRNGKey(5), (n, 16, 16, 3))
    ids, mask = np.tile(ids, (n // 2, 1)), np.tile(mask, (n // 2, 1))
    f = jax.jit(image_reward, static_argnums=0)
    want = f(model, params, images, ids, mask)
    p = jax.device_put(params, replicated(mesh))
    got = f(model, p, *shard_batch((images, ids, mask), mesh))
    assert got.sharding.spec[0] is not None  # the rewards stay sharded over the batch
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_t2i_pipeline_encodes_image_reward_prompts_with_wordpiece(tmp_path, monkeypatch):
    """The text-to-image reward pipeline gives ImageReward (ids, mask) per caption from
    config.bert_vocab, and without a vocab file refuses with the setting to fix."""
    import ml_collections

    from softdimo_jax.pipelines.t2i import PROMPT_ENCODERS
    from softdimo_jax.runtime.errors import BadInput

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat"]) + "\n")
    encode = PROMPT_ENCODERS["image_reward"](ml_collections.ConfigDict({"bert_vocab": str(vocab)}))
    ids, mask = encode(["a red cat", "a cat"])
    assert ids.shape == mask.shape == (2, 35)
    assert mask.sum(1).tolist() == [5, 4] and ids[0, :5].tolist() == [2, 5, 6, 7, 3]
    monkeypatch.delenv("SOFTDIMO_BERT_VOCAB", raising=False)
    with pytest.raises(BadInput, match="vocab"):
        PROMPT_ENCODERS["image_reward"](ml_collections.ConfigDict({"bert_vocab": ""}))


def test_evaluate_cli_scores_samples_with_image_reward(tmp_path, monkeypatch, capsys):
    """`evaluate --reward image_reward=DIR --bert-vocab vocab.txt` scores an ADM sample set
    against its captions (BERT WordPiece prompts); without a vocab it is one line, exit 2."""
    from softdimo_jax import evaluate
    from softdimo_jax.core.image_reward import image_reward
    from softdimo_jax.data.wordpiece import WordPieceTokenizer
    from softdimo_jax.runtime.converted import save_converted

    model, params, _, _ = _tiny()
    save_converted(str(tmp_path / "ir"), "blip", model, params)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog"]) + "\n")
    (tmp_path / "prompts.txt").write_text("a red cat\na dog\n")
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images)
    args = ["--samples", str(tmp_path / "s.npz"), "--prompt-file", str(tmp_path / "prompts.txt"),
            "--reward", f"image_reward={tmp_path / 'ir'}", "--batch-size", "4", "--num-devices", "1"]
    assert evaluate.main([*args, "--bert-vocab", str(vocab), "--out", str(tmp_path / "out")]) == 0
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())["rewards"]["image_reward"]
    ids, mask = WordPieceTokenizer(str(vocab))(["a red cat", "a dog", "a red cat"])
    want = np.asarray(image_reward(model, params, images.astype(np.float32) / 255.0, ids, mask))
    np.testing.assert_allclose(got["mean"], want.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["std"], want.std(), rtol=1e-3, atol=1e-5)
    capsys.readouterr()
    monkeypatch.delenv("SOFTDIMO_BERT_VOCAB", raising=False)
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate: --reward:") and "vocab" in err[0], err
