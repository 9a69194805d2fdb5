"""The evaluate CLI's text-to-image side: --reward scores an ADM sample set against its
prompt file (no FID needed) and writes each reward's mean / std to metrics.json; a tiny
MaskGen student writes a GenEval-ready folder, which --score-geneval then scores; a wrong
--reward (unknown name, another family's checkpoint) or rewards without prompts are one line
(exit 2)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax import evaluate
from softdimo_jax.data.clip_bpe import ClipBPETokenizer
from softdimo_jax.evaluation import t2i as ev
from softdimo_jax.models.clip import CLIP
from softdimo_jax.runtime.converted import save_converted

# The tiny MaskGen run (a one-step distillation exporting its student) of the families test.
from test_families import SIDE, fast_jit, maskgen_run, one_error_line  # noqa: F401 (fixtures)

CAPS = ["a red cube", "two dogs on a beach", "a bowl of soup"]
META = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}]


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    m = CLIP(embed_dim=8, image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
             context_length=77, text_width=16, text_heads=2, text_layers=1)
    p = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 77), jnp.int32))["params"]
    path = str(tmp_path_factory.mktemp("rewards") / "clip")
    save_converted(path, "openclip", m, p)
    return path


def _rc(args):
    return evaluate.main([*args, "--num-devices", "1"])


def test_reward_scores_a_sample_set(clip_ckpt, maskgen_run, tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    samples = str(tmp_path / "samples.npz")
    np.savez(samples, arr_0=images)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(CAPS) + "\n")
    out = tmp_path / "out"
    bpe = maskgen_run["bpe"]
    assert _rc(["--samples", samples, "--prompt-file", str(prompts), "--reward", f"clip_score={clip_ckpt}",
                "--bpe-merges", bpe, "--batch-size", "4", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_scored"] == 5 and "fid" not in m
    # the mean of the reward straight from evaluation.t2i, captions cycled over the samples
    rset = ev.reward_set_from_checkpoints({"clip_score": clip_ckpt}, bpe_merges=bpe)
    want = ev.score_images(rset, images, [CAPS[i % 3] for i in range(5)], batch_size=4)["clip_score"]
    np.testing.assert_allclose(m["rewards"]["clip_score"]["mean"], want.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards"]["clip_score"]["std"], want.std(), rtol=1e-4, atol=1e-6)
    assert (out / "samples_grid.png").exists()
    assert '"clip_score"' in capsys.readouterr().out

    # one-line refusals (exit 2): unknown reward, another family's checkpoint, no prompts
    bad = [(["--samples", samples, "--prompt-file", str(prompts), "--reward", f"aesthetic={clip_ckpt}"],
            "unknown reward"),
           (["--samples", samples, "--prompt-file", str(prompts), "--reward", f"hps_v2={maskgen_run['clip']}"],
            "needs a CLIP checkpoint"),
           (["--samples", samples, "--reward", f"clip_score={clip_ckpt}", "--bpe-merges", bpe], "--prompt-file"),
           (["--score-geneval", str(tmp_path)], "--reward")]
    for args, what in bad:
        assert _rc(args) == 2
        assert what in one_error_line(capsys, "evaluate")


def test_geneval_folder_from_a_maskgen_student(clip_ckpt, maskgen_run, tmp_path, capsys):
    student = os.path.join(maskgen_run["work"], "distill", "student")
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("\n".join(json.dumps(m) for m in META) + "\n")
    out = tmp_path / "geneval"
    gen = ["--generator", "student", "--checkpoint", student, "--tokenizer", maskgen_run["tok"],
           "--text-encoder", maskgen_run["clip"], "--bpe-merges", maskgen_run["bpe"], "--batch-size", "4"]
    assert _rc([*gen, "--geneval-metadata", str(meta), "--geneval-out", str(out), "--images-per-prompt", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    for i, m in enumerate(META):
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == m
        assert sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir()) == ["00000.png", "00001.png"]
    folder = ev.read_geneval_folder(str(out))
    assert folder[0][1].shape == (2, SIDE, SIDE, 3) and folder[0][1].dtype == np.uint8
    # the folder is refused a second time (not empty), then scored with the reward
    assert "2 prompts x 2 images" in capsys.readouterr().err
    assert _rc([*gen, "--geneval-metadata", str(meta), "--geneval-out", str(out)]) == 2
    assert "not empty" in one_error_line(capsys, "evaluate")
    res = tmp_path / "res"
    assert _rc(["--score-geneval", str(out), "--reward", f"clip_score={clip_ckpt}",
                "--bpe-merges", maskgen_run["bpe"], "--out", str(res)]) == 0
    m = json.loads((res / "metrics.json").read_text())
    assert m["num_scored"] == 4 and [p["prompt"] for p in m["per_prompt"]] == [x["prompt"] for x in META]
    assert np.isfinite(m["rewards"]["clip_score"]["mean"])
