"""Text-to-image evaluation (evaluation/t2i.py): GenEval folders out and back, scoring a
sample set against its prompts with the CLIP rewards, and one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.core import reward as rewards
from softdimo_jax.core.reward import REWARD_TEXT
from softdimo_jax.core.t2i_reward import prompt_reward_inputs
from softdimo_jax.data.clip_bpe import ClipBPETokenizer
from softdimo_jax.evaluation import t2i as ev
from softdimo_jax.models.clip import CLIP, HFCLIPModel
from softdimo_jax.runtime.mesh import make_mesh

META = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}]


def _tiny(cls, seed):
    m = cls(embed_dim=8, image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
            context_length=77, text_width=16, text_heads=2, text_layers=1)
    return m, m.init(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 77), jnp.int32))["params"]


@pytest.fixture(scope="module")
def rset():
    models = {"hps_v2": _tiny(CLIP, 0), "pickscore": _tiny(HFCLIPModel, 1)}
    return rewards.build_reward_set({"hps_v2": 1.0, "pickscore": 0.5}, t2i_reward_models=models,
                                    prompt_tokenizer=ClipBPETokenizer())


def test_prompt_metadata_jsonl_and_txt(tmp_path):
    p = tmp_path / "evaluation_metadata.jsonl"
    p.write_text("\n".join(json.dumps(m) for m in META) + "\n\n")
    assert ev.read_prompt_metadata(str(p)) == META
    t = tmp_path / "prompts.txt"
    t.write_text("a cat\n\n a dog \n")
    assert ev.read_prompt_metadata(str(t)) == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "x"}\n')
    with pytest.raises(ValueError, match="line 1 has no \"prompt\"") as e:
        ev.read_prompt_metadata(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        ev.read_prompt_metadata(str(tmp_path / "none.jsonl"))


def test_geneval_folder_round_trip_and_scores(tmp_path, rset):
    rng = np.random.default_rng(0)
    sets = [rng.random((3, 20, 24, 3)).astype(np.float32), rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)]
    out = str(tmp_path / "geneval")
    ev.write_geneval_folder(out, META, sets)
    assert sorted((tmp_path / "geneval").iterdir())[0].name == "00000"
    assert json.loads((tmp_path / "geneval" / "00001" / "metadata.jsonl").read_text()) == META[1]
    assert sorted(p.name for p in (tmp_path / "geneval" / "00000" / "samples").iterdir()) == [
        "00000.png", "00001.png", "00002.png"]
    back = ev.read_geneval_folder(out)
    assert [m for m, _ in back] == META
    np.testing.assert_array_equal(back[0][1], np.round(np.clip(sets[0], 0, 1) * 255).astype(np.uint8))
    np.testing.assert_array_equal(back[1][1], sets[1])
    with pytest.raises(FileExistsError, match="overwrite"):
        ev.write_geneval_folder(out, META, sets)

    res = ev.score_geneval_folder(out, rset, batch_size=4)
    assert res["num_images"] == 5 and len(res["per_prompt"]) == 2
    # the same numbers straight from the reward set on x/255 with each image's prompt
    imgs = np.concatenate([b[1] for b in back]).astype(np.float32) / 255.0
    caps = [META[0]["prompt"]] * 3 + [META[1]["prompt"]] * 2
    feats = prompt_reward_inputs(rset, caps)
    total, parts = rset.total(rset.params, jnp.asarray(imgs), {REWARD_TEXT: feats})
    np.testing.assert_allclose(res["mean"]["total"], float(np.mean(total)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["per_prompt"][1]["pickscore"], float(np.mean(parts["pickscore"][3:])), rtol=1e-5)
    # sharded over the 8-device mesh: the same scores
    sharded = ev.score_images(rset, np.concatenate([b[1] for b in back]), caps, batch_size=3, mesh=make_mesh(8))
    np.testing.assert_allclose(sharded["total"], np.asarray(total), rtol=1e-5, atol=1e-6)


def test_generate_geneval_folder_calls_the_sampler_per_prompt(tmp_path):
    seen = []

    def sample_fn(captions, rng):
        seen.append(list(captions))
        return np.full((len(captions), 8, 8, 3), 0.5, np.float32)

    ev.generate_geneval_folder(sample_fn, META, str(tmp_path / "g"), images_per_prompt=2)
    assert seen == [[META[0]["prompt"]] * 2, [META[1]["prompt"]] * 2]
    assert all(len(imgs) == 2 for _, imgs in ev.read_geneval_folder(str(tmp_path / "g")))


def test_reward_set_from_converted_checkpoints(tmp_path):
    from softdimo_jax.runtime.converted import save_converted

    m, p = _tiny(HFCLIPModel, 2)
    save_converted(str(tmp_path / "pick"), "hfclip", m, p)
    rs = ev.reward_set_from_checkpoints({"pickscore": str(tmp_path / "pick")})
    assert rs.names == ("pickscore",) and rs.weights == (1.0,)
    np.testing.assert_array_equal(rs.params[0]["logit_scale"], p["logit_scale"])
    with pytest.raises(ValueError, match="needs its converted model"):
        ev.reward_set_from_checkpoints({"pickscore": str(tmp_path / "pick")}, {"hps_v2": 1.0})
