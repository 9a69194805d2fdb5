"""Meissonic's text encoder (transformers CLIPTextModelWithProjection, CLIP-ViT-H-14): parity
with the original as Meissonic calls it, the strict text_encoder/ folder conversion and its
one-line refusals (fixtures: tests/fixtures/README.md)."""

import json

import jax
import numpy as np
import pytest

from softdimo_jax import convert as convert_cli
from softdimo_jax.conversion.meissonic import (convert_meissonic_text, convert_meissonic_transformer,
                                               meissonic_text_config_from_json, text_folder)
from softdimo_jax.conversion.state_dict import ConversionError
from softdimo_jax.data.clip_bpe import ClipBPETokenizer
from softdimo_jax.models.meissonic import MeissonicTransformer
from softdimo_jax.models.meissonic_text import MeissonicTextEncoder, meissonic_text_encode
from softdimo_jax.parity import load_fixture
from softdimo_jax.parity_checks.meissonic import build_text, check_text
from softdimo_jax.runtime.converted import load_converted


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return load_fixture(str(fixtures_dir / "meissonic_text_a.npz"))


def test_parity_hidden_states_pooled_projection_and_tokenizer(fx):
    checks = check_text(fx)
    names = {c.name for c in checks}
    assert {"encoder_hidden_states", "text_embeds", "last_hidden_state", "embeddings", "pad0_encoder_hidden_states",
            "pad0_text_embeds", "tokenizer_ids"} <= names
    assert [c.line() for c in checks if not c.passed] == []
    # The entry point gives every position's penultimate state and one pooled vector per caption.
    model = build_text(fx.cfg)
    hidden, pooled = meissonic_text_encode(model, convert_meissonic_text(fx.sd, model), fx.inputs["ids"])
    assert hidden.shape == (4, 77, 48) and pooled.shape == (4, 40)


def test_tokenizer_pads_with_the_end_token_only_when_asked():
    tok = ClipBPETokenizer()
    eot, zero = tok.tokenize("a jay", pad="eot")[0], tok.tokenize("a jay")[0]
    assert list(eot[:4]) == list(zero[:4]) == [tok.sot_id, 320, 4155, tok.eot_id]
    assert (eot[4:] == tok.eot_id).all() and (zero[4:] == 0).all()
    with pytest.raises(ValueError, match="pad must be"):
        tok.tokenize("a", pad="max_length")


def _zero_stride_sd(shapes):
    zero = np.zeros((), np.float32)  # full-size stand-ins, nothing allocated
    return {k: np.broadcast_to(zero, tuple(s)) for k, s in shapes["keys"].items()}


def test_full_size_key_list_converts_exactly(fixtures_dir):
    shapes = json.loads((fixtures_dir / "meissonic_text_full_shapes.json").read_text())
    model = MeissonicTextEncoder(**meissonic_text_config_from_json(shapes["config"]))
    assert model == MeissonicTextEncoder()  # the defaults are the released encoder
    sd = _zero_stride_sd(shapes)
    sd["text_model.embeddings.position_ids"] = np.broadcast_to(np.zeros((), np.int64), (1, 77))  # legacy buffer
    params = convert_meissonic_text(sd, model)
    assert sum(np.size(x) for x in jax.tree.leaves(params)) == shapes["num_params"]
    assert not any(params["token_embedding"]["embedding"].strides)  # a view, not a 200 MB copy
    del sd["text_model.encoder.layers.23.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"text_model\.encoder\.layers\.23\.mlp\.fc2\.bias"):
        convert_meissonic_text(sd, model)


def _write(path, cfg, sd, weights):
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / weights))
    return path


def test_convert_cli_reads_text_encoder_folder_and_refuses_other_parts(tmp_path, fx, capsys):
    cfg = dict(fx.cfg["config"], architectures=["CLIPTextModelWithProjection"])
    tdir = _write(tmp_path / "text_encoder", cfg, fx.sd, "model.safetensors")
    assert convert_cli.main(["--model", "meissonic_text", str(tdir), str(tmp_path / "out")]) == 0
    model, params = load_converted(str(tmp_path / "out"))
    assert model == build_text(fx.cfg) and model.width == 48 and model.layers == 3
    np.testing.assert_array_equal(params["text_projection"], fx.sd["text_projection.weight"].T)
    capsys.readouterr()
    # Another Meissonic part's folder (a diffusers VQModel) -> one line naming both.
    vdir = _write(tmp_path / "vqvae", {"_class_name": "VQModel", "latent_channels": 4},
                  {"encoder.down_blocks.0.resnets.0.conv1.weight": np.zeros((2, 2, 3, 3), np.float32)},
                  "diffusion_pytorch_model.safetensors")
    assert convert_cli.main(["--model", "meissonic_text", str(vdir), str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "VQModel" in err and "text_encoder/" in err
    # ... and the text folder given as the transformer is refused in one line too.
    assert convert_cli.main(["--model", "meissonic_transformer", str(tdir), str(tmp_path / "bad2")]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # A text encoder without the projection, a full CLIPModel, mismatched depths, wrong weights.
    with pytest.raises(ConversionError, match="not a CLIPTextModelWithProjection"):
        meissonic_text_config_from_json(dict(cfg, architectures=["CLIPTextModel"]))
    with pytest.raises(ConversionError, match="--model hfclip"):
        meissonic_text_config_from_json({"model_type": "clip", "text_config": {}, "vision_config": {}})
    with pytest.raises(ConversionError, match="holds 3 text layers, the config asks for 4"):
        convert_meissonic_text(fx.sd, model.clone(layers=4))
    with pytest.raises(ConversionError, match="--model meissonic_text"):
        convert_meissonic_transformer(fx.sd, MeissonicTransformer())
    fields, weights = text_folder(str(tdir))
    assert fields["pool_type"] == "argmax" and weights.endswith("model.safetensors")
    # A non-legacy eos_token_id pools at that id instead of argmax(ids).
    assert meissonic_text_config_from_json(dict(cfg, eos_token_id=49407))["pool_type"] == "eos"
