"""MaskBit teacher sampler: schedule, CFG, determinism, mesh sharding; the PNG grid writer."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.sampling import maskbit_sampler as ms
from softdimo_jax.runtime.artifacts import make_image_grid, save_image_grid

L, S, V, NUM_CLASSES, D = 16, 2, 8, 5, 16
STEPS = 8
SIZES = dict(num_tokens=L, splits=S, vocab_size=V)


def toy_params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    return {
        "tok": jax.random.normal(k[0], (S, V + 1, D)),  # +1: MASK row
        "pos": jax.random.normal(k[1], (L, D)),
        "cls": jax.random.normal(k[2], (NUM_CLASSES + 1, D)) * 2.0,  # last row: drop label
        "out": jax.random.normal(k[3], (D, S * V)),
    }


def toy_logits_fn(params, ignore_drop=False):
    """A small model that mixes positions (mean context), so decoding order matters."""

    def fn(tokens, labels, drop):
        emb = sum(params["tok"][s][tokens[..., s]] for s in range(S))  # (B, L, D)
        cls = jnp.where(drop[:, None] & (not ignore_drop), NUM_CLASSES, labels[:, None])
        h = jnp.tanh(emb + emb.mean(axis=1, keepdims=True) + params["pos"] + params["cls"][cls])
        return (h @ params["out"]).reshape(*tokens.shape, V) * 2.0

    return fn


LABELS = jnp.array([0, 1, 2, 3, 4, 0, 1, 2], jnp.int32)


@functools.lru_cache(maxsize=None)
def _compiled(ignore_drop=False, **kw):
    """One jitted sampler per setting, shared by the tests (compiling dominates their time)."""
    kw = {**dict(num_steps=STEPS), **kw}
    return jax.jit(lambda p, r, y: ms.maskbit_sample(toy_logits_fn(p, ignore_drop), r, y, **SIZES, **kw))


def run(rng=0, labels=LABELS, params_seed=0, ignore_drop=False, **kw):
    return _compiled(ignore_drop, **kw)(toy_params(params_seed), jax.random.PRNGKey(rng), labels)


def test_no_mask_left_and_valid_ids():
    out, _ = run(return_intermediates=True)  # shares the compile of the next test
    assert out.shape == (8, L, S) and out.dtype == jnp.int32
    assert int(out.min()) >= 0 and int(out.max()) < V  # MASK (= V) never survives


def test_masked_count_follows_schedule_and_fixed_tokens_stay():
    out, inter = run(return_intermediates=True)
    counts = ms.masked_counts(STEPS, L * S, "arccos")
    states = np.asarray(inter["tokens"])
    per_sample = (states == V).sum(axis=(2, 3))  # (steps, B)
    np.testing.assert_array_equal(per_sample, np.broadcast_to(counts[:, None], per_sample.shape))
    assert counts[-1] == 0 and np.all(np.diff(counts) < 0)
    # A sub-token fixed at step i keeps its value ever after; the result is the last state.
    for i in range(STEPS - 1):
        fixed = states[i] != V
        np.testing.assert_array_equal(states[i + 1][fixed], states[i][fixed])
    np.testing.assert_array_equal(states[-1], np.asarray(out))
    np.testing.assert_array_equal(np.asarray(inter["predicted"])[-1], np.asarray(out))


def test_masked_counts_match_maskbit_formula():
    # Released ImageNet setting: 16x16 tokens x 2 splits, 64 steps, arccos.
    n, steps = 512, 64
    counts = ms.masked_counts(steps, n, "arccos")
    want = [min(max(math.floor(math.acos((i + 1) / steps) / (math.pi / 2) * n), 1), n) for i in range(steps - 1)]
    np.testing.assert_array_equal(counts[:-1], want)
    assert counts[0] == 506 and counts[-1] == 0
    # Tiny grids: the clamp keeps progress (at least one sub-token fixed per step) and never
    # re-masks everything once one sub-token is left.
    tiny = ms.masked_counts(6, 4, "linear")
    assert list(tiny) == [3, 2, 1, 0, 0, 0]


def test_guidance_schedule_power_cos():
    a = ms.guidance_schedule(64, "cosine", 3.0)
    t = np.arange(64) / 64
    np.testing.assert_allclose(a, (1 - np.cos(np.pi * t**3)) / 2, atol=1e-6)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    np.testing.assert_allclose(ms.guidance_schedule(4, "linear"), [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(ms.guidance_schedule(4, "none"), 1.0)
    with pytest.raises(ValueError, match="guidance_annealing"):
        ms.guidance_schedule(4, "cosinus")


def test_cfg_one_doubled_forward_and_formula():
    params = toy_params()
    fn = toy_logits_fn(params)
    calls = []

    def counting_fn(tokens, labels, drop):
        calls.append(tokens.shape[0])
        return fn(tokens, labels, drop)

    tokens = jax.random.randint(jax.random.PRNGKey(3), (4, L, S), 0, V + 1)
    labels = LABELS[:4]
    got = ms._cfg_forward(counting_fn, tokens, labels, 1.7)
    c = fn(tokens, labels, jnp.zeros(4, bool))
    u = fn(tokens, labels, jnp.ones(4, bool))
    np.testing.assert_allclose(got, c + 1.7 * (c - u), rtol=1e-5, atol=1e-5)
    assert calls == [8]  # one forward over the doubled batch


def test_cfg_scale_zero_equals_conditional_model():
    zero = run(guidance_scale=0.0)
    # A model whose unconditional branch equals its conditional one makes any scale a no-op.
    cond_only = run(ignore_drop=True)  # default scale 7.1
    np.testing.assert_array_equal(zero, cond_only)
    # ... and the guidance does act when the branches differ (this test can fail).
    guided = run()
    assert np.mean(np.asarray(guided) != np.asarray(zero)) > 0.1


def test_deterministic_for_fixed_rng():
    a, b, c = run(rng=1), run(rng=1), run(rng=2)
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.asarray(a) != np.asarray(c)) > 0.1


def test_bad_logits_shape_is_a_clear_error():
    fn = toy_logits_fn(toy_params())
    with pytest.raises(ValueError, match="expected \\(B, L, S, V\\)"):
        ms.maskbit_sample(fn, jax.random.PRNGKey(0), LABELS, num_tokens=L, splits=S, vocab_size=V + 1, num_steps=2)


def test_sharded_8_devices_equals_1_device():
    assert jax.device_count() >= 8
    params = toy_params()
    factory = lambda p: toy_logits_fn(p)  # noqa: E731
    kw = dict(**SIZES, num_steps=STEPS, return_intermediates=True)
    one = ms.make_sharded_sampler(factory, **kw)
    # A mesh with Explicit axes (jax.make_mesh's default) and inputs already placed on it work too.
    mesh = jax.make_mesh((4, 2), meshlib.DATA_AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    eight = ms.make_sharded_sampler(factory, mesh=mesh, **kw)
    rng = jax.random.PRNGKey(5)
    t1, i1 = one(params, rng, LABELS)
    t8, i8 = eight(jax.device_put(params, meshlib.replicated(mesh)), rng, meshlib.shard_batch(LABELS, mesh))
    assert len(t8.sharding.device_set) == 8
    np.testing.assert_array_equal(t1, t8)
    np.testing.assert_array_equal(i1["tokens"], i8["tokens"])
    with pytest.raises(ValueError, match="not divisible"):
        eight(params, rng, LABELS[:6])


def test_image_grid(tmp_path):
    imgs = np.zeros((5, 4, 6, 3), np.float32)
    imgs[1] = 1.0
    imgs[4, :, :, 0] = 0.5
    grid = make_image_grid(imgs, nrow=3, padding=1)
    assert grid.shape == (2 * 4 + 3, 3 * 6 + 4, 3) and grid.dtype == np.uint8
    assert np.all(grid[1:5, 1 + 7 : 7 + 7] == 255)  # image 1: row 0, column 1
    assert np.all(grid[1 + 5 : 5 + 5, 1 + 7 : 7 + 7, 0] == 128)  # image 4: row 1, column 1
    path = tmp_path / "g.png"
    save_image_grid(imgs, path)  # nrow defaults to ceil(sqrt(5)) = 3
    back = np.asarray(Image.open(path))
    assert back.shape == (2 * 4 + 3 * 2, 3 * 6 + 4 * 2, 3)
    with pytest.raises(ValueError, match="NHWC"):
        save_image_grid(imgs[0], path)


# --- the real teacher module and the CLI -------------------------------------------------


@functools.lru_cache(maxsize=None)
def tiny_models():
    from softdimo_jax.models.maskbit_bert import LFQBert
    from softdimo_jax.models.maskbit_tokenizer import ConvVQModel

    gen = LFQBert(num_tokens=16, num_bits=6, splits=2, hidden_dim=32, depth=1, heads=2, mlp_dim=64, num_classes=5)
    gen_params = jax.jit(gen.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 2), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]
    tok = ConvVQModel(num_bits=6, hidden_channels=32, channel_mult=(1, 1), num_res_blocks=1)
    tok_params = jax.jit(tok.init)(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))["params"]
    return gen, gen_params, tok, tok_params


def test_lfq_bert_teacher_sampler_sharded_equals_single_device():
    gen, params, _, _ = tiny_models()
    kw = dict(num_steps=6, randomize_temperature=2.0)
    one = ms.make_maskbit_teacher_sampler(gen, **kw)
    eight = ms.make_maskbit_teacher_sampler(gen, mesh=meshlib.make_mesh(8), **kw)
    rng = jax.random.PRNGKey(7)
    t1, t8 = one(params, rng, LABELS), eight(params, rng, LABELS)
    assert t1.shape == (8, 16, 2) and int(t1.max()) < 8 and int(t1.min()) >= 0
    np.testing.assert_array_equal(t1, t8)


def test_sample_cli_writes_grid(tmp_path, monkeypatch):
    from absl import flags

    from softdimo_jax import sample
    from softdimo_jax.runtime.converted import save_converted
    from softdimo_jax.models import lfq

    gen, gen_params, tok, tok_params = tiny_models()
    save_converted(str(tmp_path / "G"), "maskbit_generator", gen, gen_params)
    save_converted(str(tmp_path / "T"), "maskbit_tokenizer", tok, tok_params)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "grid.png"
    argv = ["sample", "--generator=G", "--tokenizer=T", "--labels=1,2,3", "--num_steps=3",
            f"--out={out}", f"--save_tokens={tmp_path / 'ids.npy'}", "--nrow=3", "--num_devices=2", "--nocaptions"]
    sample.define_flags()
    try:
        flags.FLAGS(argv)
        sample.main(["sample"])
        img = np.asarray(Image.open(out))
        assert img.shape == (8 + 4, 3 * 8 + 8, 3)
        ids = np.load(tmp_path / "ids.npy")
        assert ids.shape == (3, 4, 4) and ids.max() < 2**6
        # Same tokens as the teacher sampler called directly (chunk 0 rng, labels padded to 2 devices).
        direct = ms.make_maskbit_teacher_sampler(gen, num_steps=3)(
            gen_params, jax.random.fold_in(jax.random.PRNGKey(0), 0), jnp.array([1, 2, 3, 0]))
        np.testing.assert_array_equal(ids, np.asarray(lfq.merge_splits(direct, 6, 2)).reshape(4, 4, 4)[:3])
        # The grid holds exactly those tokens decoded (row-major h x w, split 0 = low bits).
        images = tok.apply({"params": tok_params}, jnp.asarray(ids), method="decode_tokens")
        want = make_image_grid(np.clip(np.asarray(images), 0, 1), nrow=3).astype(int)
        np.testing.assert_allclose(img.astype(int), want, atol=1)  # jit vs eager round-off at .5
        # Student mode (one forward; any LFQBert checkpoint works as a generator); the soft
        # decode exercises the hook and the expected-bits path (hard tokens decode as above).
        out.unlink()
        flags.FLAGS(argv + ["--mode=student", "--student_mode=soft"])
        sample.main(["sample"])
        assert np.asarray(Image.open(out)).shape == (8 + 4, 3 * 8 + 8, 3)
        flags.FLAGS(argv[:3] + ["--labels=1,9"])
        with pytest.raises(ValueError, match="labels must lie in"):
            sample.main(["sample"])
    finally:
        flags.FLAGS.unparse_flags()
