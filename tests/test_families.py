"""Every family through every command: tiny converted MaskBit, MaskGIT and MaskGen teachers
are distilled by the at-scale pipeline (a step each), the exported EMA students load in
`sample` and `evaluate --generator` (hard and soft), the MaskBit GAN stage takes the
distillation settings from the run's saved config and exports its student too; prompts
reach a MaskGen student, which also writes a GenEval folder scored with a CLIP reward; TTEO runs on a MaskGIT student; bad labels, ids and checkpoints
are refused in one line. Shapes repeat across the tests (one device, batches of 4) so the
cached samplers of sampling.api compile once per family."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

from helpers import fast_compiles
from softdimo_jax import evaluate, sample
from softdimo_jax.conversion.inception import convert_inception, save_params
from softdimo_jax.core.reward import build_reward_set
from softdimo_jax.evaluation import t2i as ev
from softdimo_jax.evaluation.fid import InceptionFeatureExtractor
from softdimo_jax.models.clip import CLIP
from softdimo_jax.models.clip_text import ClipTextTransformer
from softdimo_jax.models.inception import FIDInceptionV3
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.models.maskbit_tokenizer import ConvVQModel
from softdimo_jax.models.maskgen import MaskGenVQ
from softdimo_jax.models.maskgit import MaskGITTransformer
from softdimo_jax.models.taming_vqgan import TamingVQModel
from softdimo_jax.models.tatitok import TATiTok
from softdimo_jax.parity import load_fixture
from softdimo_jax.pipelines import at_scale
from softdimo_jax.runtime.artifacts import CAPTION_LINE_PX, CAPTION_LINES, CAPTION_MIN_WIDTH
from softdimo_jax.runtime.converted import read_meta, save_converted
from softdimo_jax.runtime.mesh import make_mesh
from softdimo_jax.sampling import api, tteo

T, TW = 6, 16  # text context and width of the tiny text tower
CAPTIONS = ["a red cube", "two dogs on a beach", "a bowl of soup", "snowy mountain at dawn"]
SIDE = 16  # every tiny tokenizer decodes 16 x 16 RGB images
STRIP = CAPTION_LINES * CAPTION_LINE_PX
CELL = max(SIDE, CAPTION_MIN_WIDTH)


@pytest.fixture(scope="module")
def fast_jit():
    with fast_compiles():  # the Trainer's steps too
        yield


def _config(name, preset=None):
    spec = importlib.util.spec_from_file_location("cfg", f"configs/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(preset) if preset is not None else mod.get_config()
    c.unlock()
    return c


def _distill_settings(c, batch=8):
    c.distill.update(dict(num_steps=1, batch_size=batch, compute_dtype="float32", remat=False, num_devices=1,
                          warmup_steps=1, log_every=1, ckpt_every=1, dropout=0.0))


def _init(model, *args):
    return jax.jit(model.init)(jax.random.PRNGKey(0), *args)["params"]


def _grid_size(n, nrow):
    rows = -(-n // nrow)
    return nrow * (CELL + 2) + 2, rows * (SIDE + STRIP + 2) + 2  # PIL (width, height)


def run_sample(*args):
    """`python -m softdimo_jax.sample ARGS` in this process: (exit code)."""
    sample.define_flags()
    try:
        flags.FLAGS(["sample", *args])
        return sample.cli(["sample"])
    finally:
        flags.FLAGS.unparse_flags()


def one_error_line(capsys, tool):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tool}: "), err
    return err[0]


# ------------------------------------------------------------------------- checkpoints + runs


@pytest.fixture(scope="module")
def maskbit_run(tmp_path_factory, fast_jit):
    """Converted MaskBit teacher + tokenizer; distill (1 step), then GAN (1 step) in one workdir."""
    d = tmp_path_factory.mktemp("maskbit")
    gen = LFQBert(num_tokens=16, num_bits=6, splits=2, hidden_dim=32, depth=1, heads=2, mlp_dim=64,
                  num_classes=10, dropout=0.0)
    tok = ConvVQModel(num_bits=6, hidden_channels=32, channel_mult=(1, 1, 1), num_res_blocks=1)
    save_converted(str(d / "gen"), "maskbit_generator", gen,
                   _init(gen, jnp.zeros((1, 16, 2), jnp.int32), jnp.zeros((1,), jnp.int32)))
    save_converted(str(d / "tok"), "maskbit_tokenizer", tok, _init(tok, jnp.zeros((1, SIDE, SIDE, 3))))
    c = _config("maskbit_imagenet256_distill")
    c.update(dict(teacher_checkpoint=str(d / "gen"), tokenizer_checkpoint=str(d / "tok"), grid_samples=4,
                  grid_labels=(1, 2, 3, 9)))
    _distill_settings(c)
    work = str(d / "work")
    at_scale.distill(c, work)

    # The GAN config repeats none of the distillation overrides: they come from the run.
    g = _config("maskbit_imagenet256_gan")
    g.update(dict(teacher_checkpoint=str(d / "gen"), tokenizer_checkpoint=str(d / "tok"), grid_samples=4,
                  grid_labels=(1, 2, 3, 9)))
    g.distill.num_devices = 1  # where it runs is this run's choice
    g.data.image_size = SIDE
    g.gan.update(dict(num_steps=1, batch_size=4, gen_warmup_steps=1, log_every=1, ckpt_every=1,
                      disc_layers=(0,), disc_hidden=8))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(at_scale.tfds_images, "TfdsImageSource", _FakeImages)
        at_scale.gan(g, work)
    return {"dir": d, "work": work, "tok": str(d / "tok")}


class _FakeImages:
    """Stands in for a prepared tfds image set (random RGB images, labels < 10)."""

    def __init__(self, name, split="train", data_dir=None, image_size=256, **kw):
        self.size = image_size

    def __len__(self):
        return 32

    def get(self, indices):
        rng = np.random.default_rng(int(np.sum(indices)))
        return {"image": rng.uniform(size=(len(indices), self.size, self.size, 3)).astype(np.float32),
                "label": (np.asarray(indices) % 10).astype(np.int32)}


@pytest.fixture(scope="module")
def maskgit_run(tmp_path_factory, fast_jit):
    d = tmp_path_factory.mktemp("maskgit")
    gen = MaskGITTransformer(img_size=64, hidden_dim=32, codebook_size=16, depth=1, heads=2, mlp_dim=64,
                             dropout=0.0, nclass=5)
    vq = TamingVQModel(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(), resolution=SIDE,
                       z_channels=8, n_embed=16, embed_dim=8)
    save_converted(str(d / "gen"), "maskgit_transformer", gen,
                   _init(gen, jnp.zeros((1, 16), jnp.int32), jnp.zeros((1,), jnp.int32)))
    save_converted(str(d / "tok"), "taming_vqgan", vq, _init(vq, jnp.zeros((1, SIDE, SIDE, 3))))
    c = _config("maskgit_imagenet256_distill", "1")
    c.update(dict(teacher_checkpoint=str(d / "gen"), tokenizer_checkpoint=str(d / "tok"), grid_samples=4,
                  grid_labels=(0, 1, 2, 4)))
    _distill_settings(c)
    work = str(d / "work")
    at_scale.distill(c, work)
    return {"dir": d, "work": work, "tok": str(d / "tok"), "config": c}


@pytest.fixture(scope="module")
def maskgen_run(tmp_path_factory, fast_jit, fixtures_dir):
    d = tmp_path_factory.mktemp("maskgen")
    gen = MaskGenVQ(codebook_size=16, seq_len=8, embed_dim=32, depth=1, num_heads=2, text_embed_dim=TW,
                    micro_condition=True, micro_condition_embed_dim=8, condition_num_classes=2)
    tt = TATiTok(image_size=SIDE, enc_patch_size=8, dec_patch_size=8, enc_width=16, enc_layers=1, enc_heads=2,
                 dec_width=16, dec_layers=1, dec_heads=2, num_latent_tokens=8, token_size=4, codebook_size=16,
                 text_context_length=T, text_embed_dim=TW)
    clip = ClipTextTransformer(context_length=T, width=TW, heads=2, layers=1, embed_dim=TW)
    gp = _init(gen, jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, T, TW)), jnp.zeros((1, 1, TW)), jnp.full((1,), 6.5))
    save_converted(str(d / "gen"), "maskgen_vq", gen, gp)
    save_converted(str(d / "tok"), "tatitok", tt, _init(tt, jnp.zeros((1, SIDE, SIDE, 3)), jnp.zeros((1, T, TW))))
    save_converted(str(d / "clip"), "clip_text", clip, _init(clip, jnp.zeros((1, T), jnp.int32)))
    (d / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    c = _config("maskgen_t2i_distill", "1")
    bpe = str(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz")
    c.update(dict(teacher_checkpoint=str(d / "gen"), text_encoder_checkpoint=str(d / "clip"),
                  tokenizer_checkpoint=str(d / "tok"), bpe_merges=bpe, prompt_file=str(d / "prompts.txt"),
                  prompt_encode_chunk=8, grid_samples=4))
    _distill_settings(c)
    work = str(d / "work")
    at_scale.distill(c, work)
    return {"dir": d, "work": work, "tok": str(d / "tok"), "clip": str(d / "clip"), "bpe": bpe,
            "prompts": str(d / "prompts.txt")}


@pytest.fixture(scope="module")
def inception(tmp_path_factory, fixtures_dir):
    """The fixture-weight Inception saved as a checkpoint, run at input 75 (one small compile)."""
    path = str(tmp_path_factory.mktemp("inception") / "inception.npz")
    save_params(convert_inception(load_fixture(str(fixtures_dir / "inception_a.npz")).sd), path)
    small = functools.partial(InceptionFeatureExtractor, model=FIDInceptionV3(input_size=75, precision="highest"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "InceptionFeatureExtractor", small)
        yield path


def _evaluate(tmp_path, inception, checkpoint, tok, *extra, decode="hard", n=4):
    ref = str(tmp_path / "ref.npz")
    if not os.path.exists(ref):
        np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, SIDE, SIDE, 3), dtype=np.uint8))
    out = str(tmp_path / f"eval_{decode}")
    rc = evaluate.main(["--generator", "student", "--checkpoint", checkpoint, "--tokenizer", tok, "--decode", decode,
                        "--num-samples", str(n), "--no-pr", "--reference", ref, "--inception", inception,
                        "--out", out, "--batch-size", "4", "--num-devices", "1", "--progress-secs", "0", *extra])
    assert rc == 0
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------- tests


def test_maskbit_stages_export_students_that_sample_and_evaluate(maskbit_run, inception, tmp_path, capsys):
    work = maskbit_run["work"]
    for stage in ("distill", "gan"):
        meta = read_meta(os.path.join(work, stage, "student"))
        assert meta["family"] == "maskbit_generator" and meta["stage"] == stage
        assert meta["sampling"]["r_init"] == 0.6 and meta["config"]["dtype"] == "float32"
        for mode in ("hard", "soft"):
            with Image.open(os.path.join(work, stage, f"student_{mode}.png")) as im:
                assert im.size == (2 * (SIDE + 2) + 2,) * 2  # 4 grid_labels, 2 x 2
    # The GAN run took the distillation's settings from its saved config, not the GAN
    # config's defaults (20k steps, a batch of 512).
    saved = at_scale.saved_run_config(work, "gan")["distill"]
    assert saved["num_steps"] == 1 and saved["batch_size"] == 8 and saved["compute_dtype"] == "float32"

    out, out_dir = tmp_path / "g.png", tmp_path / "each"
    for stage, mode in (("distill", "hard"), ("gan", "soft")):
        rc = run_sample("--mode=student", f"--student_mode={mode}", f"--generator={work}/{stage}/student",
                        f"--tokenizer={maskbit_run['tok']}", "--labels=0,3,9,1", f"--out={out}", "--nrow=3",
                        f"--out_dir={out_dir}", "--num_devices=1")
        assert rc == 0
        with Image.open(out) as im:
            assert im.size == _grid_size(4, 3)
        assert sorted(os.listdir(out_dir)) == ["00000.png", "00001.png", "00002.png", "00003.png"]
        with Image.open(out_dir / "00003.png") as im:
            assert im.size == (SIDE, SIDE)

    m = _evaluate(tmp_path, inception, f"{work}/gan/student", maskbit_run["tok"], decode="soft")
    assert m["num_samples"] == 4 and np.isfinite(m["fid"])
    assert m["generator"] == {"checkpoint": f"{work}/gan/student", "family": "maskbit_generator", "stage": "gan",
                              "kind": "student", "decode": "soft"}

    # Class labels outside the model's 10 classes are refused, not wrapped.
    capsys.readouterr()
    assert run_sample("--mode=student", f"--generator={work}/gan/student", f"--tokenizer={maskbit_run['tok']}",
                      "--labels=1,10", f"--out={out}", "--num_devices=1") == 2
    assert "labels must lie in [0, 10)" in one_error_line(capsys, "sample")


def test_maskgit_student_samples_and_evaluates(maskgit_run, inception, tmp_path, capsys):
    student = os.path.join(maskgit_run["work"], "distill", "student")
    meta = read_meta(student)
    assert meta["family"] == "maskgit_transformer" and meta["stage"] == "distill"
    out = tmp_path / "g.png"
    for mode in ("hard", "soft"):
        assert run_sample("--mode=student", f"--student_mode={mode}", f"--generator={student}",
                          f"--tokenizer={maskgit_run['tok']}", "--labels=4,1,2,3", f"--out={out}", "--nrow=4",
                          "--num_devices=1") == 0
        with Image.open(out) as im:
            assert im.size == _grid_size(4, 4)
    # The teacher through the same command (2 steps).
    assert run_sample("--mode=teacher", f"--generator={maskgit_run['dir']}/gen", f"--tokenizer={maskgit_run['tok']}",
                      "--labels=4,0", "--num_steps=2", f"--out={out}", "--num_devices=1") == 0
    m = _evaluate(tmp_path, inception, student, maskgit_run["tok"], decode="hard")
    assert m["num_samples"] == 4 and m["generator"]["family"] == "maskgit_transformer"

    # TTEO takes the family's adapter and soft decode from the same API: with K = 0 it IS
    # the plain one-step sampler; K = 1 on the soft MaskGIT decode runs and reports rewards.
    gen = api.load_generator(student, maskgit_run["tok"])
    rset = build_reward_set({"brightness": 1.0})
    mesh, labels, rng = make_mesh(1), np.array([4, 1, 2, 3], np.int32), jax.random.PRNGKey(0)
    plain = tteo.make_tteo_sampler(gen.model, gen.tokenizer, rset, grid=(4, 4), steps=0, mesh=mesh)
    got = plain(gen.params, gen.tokenizer_params, rset.params, jax.random.fold_in(rng, 0), labels)
    _, ids = api.generate(gen, api.make_conditions(gen, labels=labels), mesh=mesh, batch_size=4)
    np.testing.assert_array_equal(np.asarray(got["tokens"])[..., 0].reshape(4, 4, 4), ids)
    soft = tteo.make_tteo_sampler(gen.model, gen.tokenizer, rset, grid=(4, 4), steps=1, output="soft", mesh=mesh)
    got = soft(gen.params, gen.tokenizer_params, rset.params, rng, labels)
    assert got["probs"].shape == (4, 16, 1, 16) and np.all(np.isfinite(got["reward_final"]))

    capsys.readouterr()
    assert run_sample("--mode=student", f"--generator={student}", f"--tokenizer={maskgit_run['tok']}",
                      "--labels=5", f"--out={out}") == 2
    assert "labels must lie in [0, 5)" in one_error_line(capsys, "sample")
    # A stage's grid labels out of range are refused too (they were taken modulo before).
    c = maskgit_run["config"]
    c.grid_labels = (0, 7)
    with pytest.raises(ValueError, match=r"config.grid_labels"):
        at_scale.distill(c, maskgit_run["work"])


def test_maskgen_student_takes_prompts(maskgen_run, inception, tmp_path, capsys):
    student = os.path.join(maskgen_run["work"], "distill", "student")
    meta = read_meta(student)
    assert meta["family"] == "maskgen_vq" and meta["sampling"]["r_init"] == 0.5
    with Image.open(os.path.join(maskgen_run["work"], "distill", "student_soft.png")) as im:
        assert im.size == (2 * (SIDE + 2) + 2,) * 2  # the file's 4 captions, 2 x 2
    text = [f"--text_encoder={maskgen_run['clip']}", f"--bpe_merges={maskgen_run['bpe']}"]
    out, out_dir = tmp_path / "t2i.png", tmp_path / "each"
    (tmp_path / "two.txt").write_text("a bowl of soup\n\nsnowy mountain at dawn\n")
    for mode in ("hard", "soft"):
        rc = run_sample("--mode=student", f"--student_mode={mode}", f"--generator={student}",
                        f"--tokenizer={maskgen_run['tok']}", *text, "--prompt=a cat", "--prompt=a dog",
                        f"--prompt_file={tmp_path / 'two.txt'}", f"--out={out}", f"--out_dir={out_dir}",
                        "--nrow=3", f"--save_tokens={tmp_path / 'ids.npy'}", "--num_devices=1")
        assert rc == 0
        with Image.open(out) as im:
            assert im.size == _grid_size(4, 3)
            grid = np.asarray(im)
        # Each caption strip holds dark text on white.
        strip = grid[2 + SIDE : 2 + SIDE + STRIP, 2 : 2 + CELL]
        assert strip.min() < 128 and np.median(strip) == 255
        assert len(os.listdir(out_dir)) == 4
        ids = np.load(tmp_path / "ids.npy")
        assert ids.shape == (4, 8) and ids.max() < 16
    # The converted teacher through the same command (MaskGen's multi-step sampler, 2 steps).
    assert run_sample("--mode=teacher", f"--generator={maskgen_run['dir']}/gen", f"--tokenizer={maskgen_run['tok']}",
                      *text, "--prompt=a cat", "--prompt=a dog", "--num_steps=2", f"--out={out}",
                      "--num_devices=1") == 0
    with Image.open(out) as im:
        assert im.size == _grid_size(2, 2)
    m = _evaluate(tmp_path, inception, student, maskgen_run["tok"], "--text-encoder", maskgen_run["clip"],
                  "--bpe-merges", maskgen_run["bpe"], "--prompt-file", maskgen_run["prompts"], decode="soft", n=4)
    assert m["num_samples"] == 4 and m["generator"]["family"] == "maskgen_vq"

    capsys.readouterr()
    # Prompts need the text tower; labels are refused for a text-to-image generator.
    assert run_sample("--mode=student", f"--generator={student}", f"--tokenizer={maskgen_run['tok']}",
                      "--prompt=a cat", f"--out={out}", "--num_devices=1") == 2
    assert "--text_encoder" in one_error_line(capsys, "sample")
    assert run_sample("--mode=student", f"--generator={student}", f"--tokenizer={maskgen_run['tok']}", *text,
                      "--labels=1", f"--out={out}", "--num_devices=1") == 2
    assert "text-to-image" in one_error_line(capsys, "sample")


def test_prompt_ids_outside_the_text_vocabulary_are_refused(maskgen_run, tmp_path, capsys):
    """A small text tower with the real BPE tokenizer: the ids are refused where they enter."""
    small = ClipTextTransformer(vocab_size=300, context_length=T, width=TW, heads=2, layers=1, embed_dim=TW)
    save_converted(str(tmp_path / "clip"), "clip_text", small, _init(small, jnp.zeros((1, T), jnp.int32)))
    student = os.path.join(maskgen_run["work"], "distill", "student")
    assert run_sample("--mode=student", f"--generator={student}", f"--tokenizer={maskgen_run['tok']}",
                      f"--text_encoder={tmp_path / 'clip'}", f"--bpe_merges={maskgen_run['bpe']}",
                      "--prompt=a photograph of a cat", f"--out={tmp_path / 'x.png'}", "--num_devices=1") == 2
    line = one_error_line(capsys, "sample")
    assert "outside the text tower's vocabulary of 300" in line and "a photograph of a cat" in line


def test_bad_checkpoints_are_one_line(maskbit_run, maskgen_run, tmp_path, capsys):
    work, tok = maskbit_run["work"], maskbit_run["tok"]
    cases = [
        ([f"--generator={tmp_path / 'nothing'}", f"--tokenizer={tok}", "--labels=1"], "not a converted checkpoint"),
        ([f"--generator={tok}", f"--tokenizer={tok}", "--labels=1"], "holds a maskbit_tokenizer checkpoint"),
        ([f"--generator={work}/distill/student", f"--tokenizer={maskgen_run['tok']}", "--labels=1"],
         "not a maskbit_tokenizer"),
        ([f"--tokenizer={tok}", "--labels=1"], "pass --generator"),
        ([f"--generator={work}/distill/student", f"--tokenizer={tok}"], "nothing to sample"),
    ]
    for args, want in cases:
        assert run_sample("--mode=student", *args, f"--out={tmp_path / 'x.png'}") == 2
        assert want in one_error_line(capsys, "sample")
    # The real command: one line on stderr, exit 2; --debug gives the traceback.
    cmd = [sys.executable, "-m", "softdimo_jax.sample", f"--generator={tmp_path / 'nothing'}",
           f"--tokenizer={tok}", "--labels=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("sample: ")
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr


def test_evaluate_refuses_before_reference_work_and_makes_references(maskgen_run, inception, tmp_path, capsys):
    student = os.path.join(maskgen_run["work"], "distill", "student")
    ref = str(tmp_path / "ref.npz")
    # Text generator without prompts: refused before Inception (whose path does not exist).
    assert evaluate.main(["--generator", "student", "--checkpoint", student, "--tokenizer", maskgen_run["tok"],
                          "--text-encoder", maskgen_run["clip"], "--bpe-merges", maskgen_run["bpe"],
                          "--reference", ref, "--inception", "missing.pth"]) == 2
    assert "--prompt-file" in one_error_line(capsys, "evaluate")
    # References from a folder of images and from an ADM .npz of images.
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 20, 24, 3), dtype=np.uint8)
    folder = tmp_path / "real"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    npz = str(tmp_path / "real.npz")
    np.savez(npz, arr_0=images[:, :SIDE, :SIDE])
    for source, n in ((str(folder), 5), (npz, 5)):
        assert evaluate.main(["--make-reference", source, "--image-size", str(SIDE), "--reference", ref,
                              "--inception", inception, "--batch-size", "4", "--num-devices", "1",
                              "--progress-secs", "0"]) == 0
        with np.load(ref) as z:
            assert int(z["num_samples"]) == n and z["mu"].shape == (2048,)
    capsys.readouterr()
    assert evaluate.main(["--make-reference", "no_such_dataset_xyz", "--reference", ref, "--inception", inception,
                          "--batch-size", "4"]) == 2
    line = one_error_line(capsys, "evaluate")
    assert "no_such_dataset_xyz" in line and "image folder" in line


# ------------------------------------------------------------------------- text-to-image rewards, GenEval
# evaluate --reward scores an ADM sample set against its prompt file (no FID needed) and
# writes each reward's mean / std; the MaskGen student writes a GenEval-ready folder, which
# --score-geneval then scores; a wrong --reward or rewards without prompts are one line.


REWARD_CAPS = ["a red cube", "two dogs on a beach", "a bowl of soup"]
GENEVAL_META = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
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


def test_reward_scores_a_sample_set(clip_ckpt, maskgen_run, inception, tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    samples = str(tmp_path / "samples.npz")
    np.savez(samples, arr_0=images)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(REWARD_CAPS) + "\n")
    out = tmp_path / "out"
    bpe = maskgen_run["bpe"]
    assert _rc(["--samples", samples, "--prompt-file", str(prompts), "--reward", f"clip_score={clip_ckpt}",
                "--bpe-merges", bpe, "--batch-size", "4", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_scored"] == 5 and "fid" not in m
    # the mean of the reward straight from evaluation.t2i, captions cycled over the samples
    rset = ev.reward_set_from_checkpoints({"clip_score": clip_ckpt}, bpe_merges=bpe)
    want = ev.score_images(rset, images, [REWARD_CAPS[i % 3] for i in range(5)], batch_size=4)["clip_score"]
    np.testing.assert_allclose(m["rewards"]["clip_score"]["mean"], want.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards"]["clip_score"]["std"], want.std(), rtol=1e-4, atol=1e-6)
    assert (out / "samples_grid.png").exists()
    assert '"clip_score"' in capsys.readouterr().out
    # beside FID: the same reward numbers, scored on the batches Inception reads
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=np.random.default_rng(1).integers(0, 256, (8, SIDE, SIDE, 3), dtype=np.uint8))
    assert _rc(["--samples", samples, "--prompt-file", str(prompts), "--reward", f"clip_score={clip_ckpt}",
                "--bpe-merges", bpe, "--batch-size", "4", "--no-pr", "--reference", ref, "--inception", inception,
                "--progress-secs", "0", "--out", str(tmp_path / "fid")]) == 0
    f = json.loads((tmp_path / "fid" / "metrics.json").read_text())
    assert np.isfinite(f["fid"]) and f["num_samples"] == 5
    np.testing.assert_allclose(f["rewards"]["clip_score"]["mean"], want.mean(), rtol=1e-5, atol=1e-6)
    capsys.readouterr()

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
    meta.write_text("\n".join(json.dumps(m) for m in GENEVAL_META) + "\n")
    out = tmp_path / "geneval"
    gen = ["--generator", "student", "--checkpoint", student, "--tokenizer", maskgen_run["tok"],
           "--text-encoder", maskgen_run["clip"], "--bpe-merges", maskgen_run["bpe"], "--batch-size", "4"]
    assert _rc([*gen, "--geneval-metadata", str(meta), "--geneval-out", str(out), "--images-per-prompt", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    for i, m in enumerate(GENEVAL_META):
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == m
        assert sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir()) == ["00000.png", "00001.png"]
    folder = ev.read_geneval_folder(str(out))
    assert folder[0][1].shape == (2, SIDE, SIDE, 3) and folder[0][1].dtype == np.uint8
    # the folder is refused a second time (not empty), then scored with the reward
    assert "2 prompts x 2 images" in capsys.readouterr().err
    assert _rc([*gen, "--geneval-metadata", str(meta), "--geneval-out", str(out)]) == 2
    assert "not empty" in one_error_line(capsys, "evaluate")
    # rewards of the generator's own samples (its captions), no FID, samples saved on the way
    assert _rc([*gen, "--prompt-file", maskgen_run["prompts"], "--num-samples", "4", "--reward",
                f"clip_score={clip_ckpt}", "--save-samples", str(tmp_path / "s.npz"), "--out", str(tmp_path / "g")]) == 0
    g = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert g["num_scored"] == 4 and g["generator"]["family"] == "maskgen_vq"
    assert np.isfinite(g["rewards"]["clip_score"]["std"])
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (4, SIDE, SIDE, 3)
    capsys.readouterr()
    res = tmp_path / "res"
    assert _rc(["--score-geneval", str(out), "--reward", f"clip_score={clip_ckpt}",
                "--bpe-merges", maskgen_run["bpe"], "--out", str(res)]) == 0
    m = json.loads((res / "metrics.json").read_text())
    assert m["num_scored"] == 4 and [p["prompt"] for p in m["per_prompt"]] == [x["prompt"] for x in GENEVAL_META]
    assert np.isfinite(m["rewards"]["clip_score"]["mean"])
