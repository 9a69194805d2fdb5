"""CLIP reward models (models/clip.py, conversion/clip.py): parity with the originals,
strict conversion of the full-size key lists, converted-checkpoint round trip, bad inputs."""

import json

import jax
import numpy as np
import pytest

from softdimo_jax import convert as convert_cli
from softdimo_jax import parity
from softdimo_jax.conversion.clip import convert_hfclip, convert_openclip, openclip_defaults, openclip_vit_l_14_overrides
from softdimo_jax.conversion.state_dict import ConversionError
from softdimo_jax.models.clip import CLIP, HFCLIPModel, clip_expected_params, hfclip_from_cfg, openclip_from_cfg
from softdimo_jax.runtime.converted import load_converted, module_config


def _count(tree):
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _const_sd(shapes):
    # Stride-0 views: a 1B-parameter state dict without allocating it.
    return {k: np.broadcast_to(np.float32(0.0), tuple(v)) for k, v in shapes.items()}


@pytest.mark.parametrize("name", ["reward_openclip_a", "reward_hfclip_a"])
def test_fixture_parity(fixtures_dir, name):
    checks = parity.run_fixture(str(fixtures_dir / f"{name}.npz"))
    failed = [c.line() for c in checks if not c.passed]
    assert not failed, "\n".join(failed)
    names = {c.name for c in checks}
    assert {"preprocessed", "score_from_raw", "logits_per_image"} <= names
    if name == "reward_openclip_a":
        assert {"hps_score", "quickgelu/hps_score", "quickgelu/score_from_raw", "quickgelu/image_features"} <= names
    else:
        assert {"pickscore", "text_last_hidden_state"} <= names


def test_quickgelu_changes_the_features(fixtures_dir):
    # the quickgelu/ outputs are a real second check, not a copy of the GELU ones
    fx = parity.load_fixture(str(fixtures_dir / "reward_openclip_a.npz"))
    assert np.abs(fx.outputs["image_features"] - fx.outputs["quickgelu/image_features"]).max() > 1e-3


@pytest.mark.parametrize(
    "file,family,overrides,millions",
    [
        ("reward_openclip_vit_h_14_full_shapes.json", "openclip", {}, 986.1),
        ("reward_openclip_vit_l_14_full_shapes.json", "openclip", openclip_vit_l_14_overrides(), 427.6),
        ("reward_hfclip_vit_h_14_full_shapes.json", "hfclip", {}, 986.1),
    ],
)
def test_full_size_key_lists_convert(fixtures_dir, file, family, overrides, millions):
    shapes = json.loads((fixtures_dir / file).read_text())["keys"]
    cls = CLIP if family == "openclip" else HFCLIPModel
    model = cls(**{**openclip_defaults(), **overrides, "variable_length": family == "hfclip"})
    sd = _const_sd(shapes)
    if family == "hfclip":  # legacy checkpoints carry the position-id buffers: skipped
        sd["text_model.embeddings.position_ids"] = np.arange(77)[None]
        sd["vision_model.embeddings.position_ids"] = np.arange(257)[None]
    params = (convert_openclip if family == "openclip" else convert_hfclip)(sd, model)
    n = _count(params)
    assert n == _count(clip_expected_params(model))
    assert abs(n / 1e6 - millions) < 0.1
    assert n == int(sum(np.prod(v) for v in shapes.values()))


def test_convert_cli_round_trip_and_wrong_family(fixtures_dir, tmp_path):
    path = str(fixtures_dir / "reward_hfclip_a.npz")
    fx = parity.load_fixture(path)
    model = hfclip_from_cfg(fx.cfg)
    over = {k: v for k, v in module_config(model).items() if k != "dtype"}
    _, params = convert_cli.convert("hfclip", path, str(tmp_path / "pick"), overrides=over)
    loaded_model, loaded = load_converted(str(tmp_path / "pick"))
    assert isinstance(loaded_model, HFCLIPModel)
    np.testing.assert_array_equal(loaded["visual"]["proj"], params["visual"]["proj"])
    # a PickScore checkpoint given as OpenCLIP: one line naming the fix
    oc = openclip_from_cfg(parity.load_fixture(str(fixtures_dir / "reward_openclip_a.npz")).cfg)
    with pytest.raises(ConversionError, match="--model hfclip") as e:
        convert_openclip(fx.sd, oc)
    assert "\n" not in str(e.value)
    with pytest.raises(ConversionError, match="--model openclip"):
        convert_hfclip(parity.load_fixture(str(fixtures_dir / "reward_openclip_a.npz")).sd, model)


def test_text_tower_refuses_wrong_context(fixtures_dir):
    fx = parity.load_fixture(str(fixtures_dir / "reward_openclip_a.npz"))
    model = openclip_from_cfg(fx.cfg)
    params = convert_openclip(fx.sd, model)
    with pytest.raises(ValueError, match="context length"):
        model.apply({"params": params}, np.zeros((1, 78), np.int32), method=CLIP.encode_text)


def test_bpe_merges_ship_with_the_package(monkeypatch, fixtures_dir):
    from softdimo_jax.data import clip_bpe

    monkeypatch.delenv("SOFTDIMO_CLIP_BPE", raising=False)
    path = clip_bpe.default_merges_path()
    assert path is not None and path.endswith(clip_bpe.PACKAGED_MERGES)
    ids = clip_bpe.ClipBPETokenizer().tokenize(["a photo of a cat"])
    assert ids[0, 0] == 49406 and 49407 in ids[0] and ids.shape == (1, 77)
