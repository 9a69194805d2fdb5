"""Meissonic behind the common sampling API and in-run prompt encoding: the `:tiny` preset
distils from a prompt file encoded by a tiny random Meissonic text tower (a converted
`meissonic_text` checkpoint); the encoding equals the tower's outside the run; the exported
student samples through `python -m softdimo_jax.sample` from `--prompt` (hard and soft), the
converted teacher multi-step with CFG over the negative prompt, and `evaluate --generator`
writes its outputs. 8 CPU devices (conftest), tiny sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import FAST
from softdimo_jax.core.adapters import MeissonicAdapter
from softdimo_jax.data.clip_bpe import ClipBPETokenizer
from softdimo_jax.models.meissonic import DIMO_NEGATIVE_PROMPT
from softdimo_jax.models.meissonic_text import MeissonicTextEncoder, meissonic_text_encode
from softdimo_jax.pipelines import at_scale, meissonic_t2i, phases
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.converted import load_converted, read_meta, save_converted
from softdimo_jax.runtime.errors import BadInput
from softdimo_jax.sampling.meissonic_sampler import meissonic_generate
from softdimo_jax.sampling.student import one_step_logits
from test_families import _evaluate, inception, run_sample  # noqa: F401  (inception: a fixture)
from test_meissonic_distill import _tiny_config

CAPTIONS = ["a red cube", "two dogs on a beach", "a bowl of soup"]
CTX = 8  # the tiny tower's context (ids padded with the end token to 8)


def _tower():
    # The tiny preset's transformer reads 12-wide states and 16-wide pooled projections.
    return MeissonicTextEncoder(context_length=CTX, width=12, heads=2, layers=2, embed_dim=16)


def _encode_outside(model, params, texts):
    """Meissonic's pipeline: ids padded with the end token, hidden_states[-2] and the pooled projection."""
    ids = ClipBPETokenizer(context_length=CTX).tokenize(texts, pad="eot")
    hidden, pooled = meissonic_text_encode(model, params, jnp.asarray(ids))
    return np.asarray(hidden), np.asarray(pooled)


@pytest.fixture(scope="module", autouse=True)
def fast_jit():
    """Unoptimised XLA for the jits made at run time (the samplers of sampling.api, the step)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=FAST))
        mp.setattr(phases, "step_compiler_options", lambda dcfg: FAST)
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, fast_jit):
    """One step of the tiny preset from a prompt file (the table the run built is kept), the
    random teacher / VQ saved as converted checkpoints."""
    d = tmp_path_factory.mktemp("meissonic_sampling")
    text = _tower()
    tp = jax.jit(text.init)(jax.random.PRNGKey(5), jnp.zeros((1, CTX), jnp.int32))["params"]
    save_converted(str(d / "text"), "meissonic_text", text, tp)
    (d / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    config = _tiny_config(prompt_file=str(d / "prompts.txt"), text_encoder_checkpoint=str(d / "text"),
                          prompt_encode_chunk=4, grid_samples=0)  # the grid's rows: tested below
    config.distill.num_steps = 1
    tables = []
    table_fn = meissonic_t2i.prompt_table
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meissonic_t2i, "prompt_table", lambda *a, **k: tables.append(table_fn(*a, **k)) or tables[-1])
        at_scale.distill(config, str(d / "work"))
    model, params, (vq, vq_params) = meissonic_t2i.random_models(config)
    save_converted(str(d / "teacher"), "meissonic_transformer", model, params)
    save_converted(str(d / "vq"), "meissonic_vqvae", vq, vq_params)
    return {"dir": d, "config": config, "table": tables[0], "text": (text, tp), "teacher": (model, params),
            "student": str(d / "work" / "distill" / "student"), "vq": str(d / "vq"),
            "cli": [f"--tokenizer={d / 'vq'}", f"--text_encoder={d / 'text'}"]}


def test_in_run_prompt_encoding_equals_the_tower_outside(run):
    """The run's table (this host's captions, encoded once, sharded over the 8 devices in chunks
    of 8) is the tower's own output on the same captions, and its null condition is Di[M]O's
    negative prompt."""
    table = run["table"]
    assert table.captions == CAPTIONS and table.condition.shape == (3, CTX, 12)
    hidden, pooled = _encode_outside(*run["text"], CAPTIONS + [DIMO_NEGATIVE_PROMPT])
    np.testing.assert_allclose(table.condition, hidden[:3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table.pooled[:, 0], pooled[:3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table.null_condition[0], hidden[3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table.null_pooled[0, 0], pooled[3], rtol=1e-5, atol=1e-5)
    assert np.abs(table.condition[0] - table.condition[1]).max() > 1e-3  # captions differ
    # Two hosts: each encodes its own lines (i mod 2), the same rows as the whole table's.
    model = run["teacher"][0]
    half = meissonic_t2i.prompt_table(run["config"], model, index=1, count=2)
    assert half.captions == CAPTIONS[1::2]
    np.testing.assert_allclose(half.condition, table.condition[1::2], rtol=1e-5, atol=1e-5)
    # The stage's one-step grid encodes only the file's first captions, repeated to fill it.
    grid = meissonic_t2i.grid_conditions(run["config"], model, 5)
    np.testing.assert_allclose(grid["condition"], table.condition[[0, 1, 2, 0, 1]], rtol=1e-5, atol=1e-5)


def test_prompt_file_refusals_are_one_line(run, tmp_path):
    model = run["teacher"][0]
    c = lambda **kw: _tiny_config(**{**dict(prompt_file=run["config"].prompt_file,
                                            text_encoder_checkpoint=run["config"].text_encoder_checkpoint), **kw})
    cases = [
        (c(prompt_file=str(tmp_path / "none.txt")), "prompt file not found"),
        (c(text_encoder_checkpoint=""), "config.text_encoder_checkpoint"),
        (c(text_encoder_checkpoint=run["vq"]), "holds a meissonic_vqvae checkpoint, not a meissonic_text"),
        (c(prompt_embeddings=str(tmp_path / "p.npz")), "both set"),
    ]
    wide = MeissonicTextEncoder(context_length=CTX, width=8, heads=2, layers=1, embed_dim=16)
    save_converted(str(tmp_path / "wide"), "meissonic_text", wide,
                   jax.jit(wide.init)(jax.random.PRNGKey(0), jnp.zeros((1, CTX), jnp.int32))["params"])
    cases.append((c(text_encoder_checkpoint=str(tmp_path / "wide")), "8-wide states"))
    for config, what in cases:
        with pytest.raises(BadInput, match=what) as e:
            meissonic_t2i.prompt_table(config, model)
        assert "\n" not in str(e.value) and " — " in str(e.value)


def test_student_samples_through_the_cli_from_a_prompt(run, tmp_path, capsys):
    """The exported student (model.json: r_init 0.5, σ 0.3, the 4x4 grid) through `sample`: its
    tokens are drawn from the one-step forward on the tower's encoding of the prompts (the batch
    padded to the 8 devices with the first prompt), images 8x8 through the VQ model."""
    student = run["student"]
    meta = read_meta(student)
    assert meta["family"] == "meissonic_transformer" and meta["stage"] == "distill"
    assert meta["sampling"]["token_grid"] == [4, 4] and meta["sampling"]["sigma_init"] == 0.3
    prompts = ["a cat", "a dog"]
    out, ids_path = tmp_path / "s.png", tmp_path / "ids.npy"
    assert run_sample("--mode=student", f"--generator={student}", *run["cli"], *[f"--prompt={p}" for p in prompts],
                      f"--out={out}", f"--save_tokens={ids_path}",
                      f"--out_dir={tmp_path / 'each'}", "--seed=3") == 0
    ids = np.load(ids_path)
    assert ids.shape == (2, 4, 4) and ids.max() < 16
    with Image.open(tmp_path / "each" / "00001.png") as im:
        assert im.size == (8, 8)

    model, params = load_converted(student)
    hidden, pooled = _encode_outside(*run["text"], prompts)
    rows = np.asarray([0, 1] + [0] * 6)  # generate pads the batch to the 8 devices with row 0
    labels = {"condition": jnp.asarray(hidden[rows]), "pooled": jnp.asarray(pooled[rows])[:, None]}
    zeros = lambda d: np.zeros((1, 1, d), np.float32)
    adapter = MeissonicAdapter.from_module(model, zeros(12), zeros(16), (4, 4))
    k_in, k_out = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), 0))
    z = jax.jit(lambda p, k, c: one_step_logits(adapter, p, k, c, r_init=0.5, sigma_init=0.3))(params, k_in, labels)
    want = np.asarray(jax.random.categorical(k_out, z, axis=-1))[:2, :, 0].reshape(2, 4, 4)
    assert (ids == want).mean() >= 0.9, (ids, want)  # round-off may flip a near tie

    # The soft decode: the VQ model reads the codebook mixture.
    assert run_sample("--mode=student", "--student_mode=soft", f"--generator={student}", *run["cli"],
                      "--prompt=a cat", f"--out_dir={tmp_path / 'soft'}", f"--out={out}") == 0
    with Image.open(tmp_path / "soft" / "00000.png") as im, Image.open(tmp_path / "each" / "00000.png") as hard:
        assert im.size == (8, 8) and not np.array_equal(np.asarray(im), np.asarray(hard))
    capsys.readouterr()
    assert run_sample("--mode=student", f"--generator={student}", f"--tokenizer={run['vq']}",
                      f"--text_encoder={run['student']}", "--prompt=a cat", f"--out={out}") == 2
    assert "not a meissonic_text" in capsys.readouterr().err
    assert run_sample("--mode=student", f"--generator={student}", *run["cli"], "--prompt=a cat", "--token_grid=4,6",
                      f"--out={out}") == 2
    assert "square even" in capsys.readouterr().err


def test_teacher_samples_multi_step_through_the_cli(run, tmp_path):
    """The converted teacher through `sample --mode teacher`: Meissonic's sampler with CFG over
    the negative prompt on the tower's encodings, the same ids as calling it directly."""
    ids_path = tmp_path / "ids.npy"
    assert run_sample("--mode=teacher", f"--generator={run['dir'] / 'teacher'}", *run["cli"], "--prompt=a cat",
                      "--prompt=snow at dawn", "--num_steps=3", "--guidance_scale=4", "--token_grid=4",
                      f"--out={tmp_path / 't.png'}", f"--save_tokens={ids_path}", "--seed=1") == 0
    ids = np.load(ids_path)
    model, params = run["teacher"]
    hidden, pooled = _encode_outside(*run["text"], ["a cat", "snow at dawn", DIMO_NEGATIVE_PROMPT])
    rows, neg = np.asarray([0, 1] + [0] * 6), np.full(8, 2)
    mesh = meshlib.make_mesh()
    # Placed as sampling.api places a batch (the same compiled sampler serves both calls).
    cond = meshlib.shard_batch({"pooled": pooled[rows, None], "condition": hidden[rows],
                                "null_pooled": pooled[neg, None], "null_condition": hidden[neg]}, mesh)
    want = meissonic_generate(model, jax.device_put(params, meshlib.replicated(mesh)), cond["pooled"][:, 0],
                              cond["condition"], cond["null_pooled"][:1, 0], cond["null_condition"][:1],
                              jnp.asarray((1024.0, 1024.0, 0.0, 0.0, 6.0)), jax.random.fold_in(jax.random.PRNGKey(1), 0),
                              grid=(4, 4), num_steps=3, guidance_scale=4.0)
    want = np.asarray(want)[:2]
    assert ids.shape == (2, 4, 4) and (ids == want).mean() >= 0.9, (ids, want)


def test_evaluate_generates_from_the_student(run, inception, tmp_path):
    """`evaluate --generator student` over a prompt file (FID against a random reference):
    metrics.json names the family and stage, --save-samples holds the 8x8 images."""
    samples = str(tmp_path / "samples.npz")
    # 8 devices, batch 8, hard: the student sampler `sample` compiled above serves this too.
    m = _evaluate(tmp_path, inception, run["student"], run["vq"], "--text-encoder", str(run["dir"] / "text"),
                  "--prompt-file", run["config"].prompt_file, "--save-samples", samples, "--num-devices", "8",
                  "--batch-size", "8", decode="hard", n=4)
    assert m["num_samples"] == 4 and np.isfinite(m["fid"])
    assert m["generator"] == {"checkpoint": run["student"], "family": "meissonic_transformer", "stage": "distill",
                              "kind": "student", "decode": "hard"}
    with np.load(samples) as z:
        assert z["arr_0"].shape == (4, 8, 8, 3) and z["arr_0"].dtype == np.uint8
