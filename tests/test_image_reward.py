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
    v = model.init(jax.random.PRNGKey(1), images, ids, mask)
    out = model.apply(v, images, ids, mask)
    assert out.image_embeds.shape == (2, 1 + 36, 32)
    assert out.text_last_hidden_state.shape == (2, 5, 24)
    np.testing.assert_allclose(out.reward, (out.mlp_raw - 0.5) / 2.0, rtol=1e-6)
    # Padded positions do not change the [CLS] feature (the -10000 bias makes them ~0 weight).
    out2 = model.apply(v, images, np.where(mask > 0, ids, 7), mask)
    np.testing.assert_allclose(out2.text_cls_feature, out.text_cls_feature, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the text encoder's 12 positions"):
        model.apply(v, images, np.ones((2, 13), np.int32), np.ones((2, 13), np.int32))
    with pytest.raises(ValueError, match=r"\(B, 48, 48, 3\)"):
        model.apply(v, images[:, :40], ids, mask)
