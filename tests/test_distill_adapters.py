"""Di[M]O distillation on the MaskGIT and MaskGen teachers (core/adapters.py) and the
prompt-file conditions of text-to-image distillation (data/prompts.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.data import prompts
from softdimo_jax.models.clip_text import ClipTextTransformer
from softdimo_jax.models.maskgen import MaskGenVQ
from softdimo_jax.models.maskgit import MaskGITTransformer
from softdimo_jax.runtime.mesh import make_mesh
from helpers import FAST, HashTokenizer, distill_stepper
from softdimo_jax.core import adapters, dimo, masking, optim
from softdimo_jax.core.defaults import default_distill_config
from softdimo_jax.pipelines import at_scale
from softdimo_jax.runtime import mesh as meshlib
B = 8
K = 16  # codebook size of both tiny teachers
CAPTIONS = ["a red cube", "two dogs on a beach", "", "a bowl of soup", "snowy mountain at dawn"]


def _jit(fn):
    # Eager op-by-op dispatch on 8 fake devices is slower than one compile at -O0.
    return jax.jit(fn, compiler_options=FAST)


def _config(**kw):
    c = default_distill_config()
    c.update(dict(batch_size=B, lr=3e-3, warmup_steps=1, dropout=0.0))
    c.update(kw)
    return c


def _leaves(tree):
    return {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _check_moved(teacher, gen, frozen_prefixes, unused=()):
    t, g = _leaves(teacher), _leaves(gen)
    t = {k: v for k, v in t.items() if not k.startswith(tuple(unused))}
    frozen = [k for k in t if k.split("/")[0] in frozen_prefixes]
    assert frozen
    for k in frozen:
        np.testing.assert_array_equal(g[k], t[k], err_msg=k)
    moved = [k for k in t if k not in frozen and not np.array_equal(g[k], t[k])]
    # Every trainable leaf that gets a gradient moves (all of them in these tiny models).
    assert len(moved) == len(t) - len(frozen), sorted(set(t) - set(frozen) - set(moved))


# ------------------------------------------------------------------------------- MaskGIT


@pytest.fixture(scope="module")
def maskgit():
    m = MaskGITTransformer(img_size=64, hidden_dim=32, codebook_size=K, depth=1, heads=2, mlp_dim=64,
                           dropout=0.1, nclass=3)
    params = _jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]
    # Distinct class / null-class rows and a peaked head so CFG and the divergences matter.
    params["tok_emb"]["embedding"] = params["tok_emb"]["embedding"] * 3.0
    return m, params


def test_maskgit_adapter_shapes_cfg_and_frozen_groups(maskgit):
    m, params = maskgit
    a = adapters.make_adapter(m, _config())
    assert isinstance(a, adapters.MaskGITAdapter)
    assert (a.num_tokens, a.splits, a.vocab_size, a.mask_token, a.num_classes) == (16, 1, K, K, 3)

    @_jit
    def run(params):
        labels, tokens = masking.initial_tokens(jax.random.PRNGKey(1), B, a, r_init=0.6)
        z = a.teacher_logits(params, tokens, labels)
        full = m.apply({"params": params}, tokens[..., 0], labels)
        # Teacher CFG: u + w (c − u) with u from the null class.
        guided = dimo.teacher_cfg_logits(a, params, tokens, labels, 2.0, "uncond_plus")
        u = m.apply({"params": params}, tokens[..., 0], labels, drop_label=jnp.ones((B,), bool))
        return tokens, z, full, guided, u, a.embed(params, tokens)

    tokens, z, full, guided, u, emb = jax.device_get(run(params))
    assert tokens.shape == (B, 16, 1)
    np.testing.assert_array_equal((tokens == K).sum(1), round(0.6 * 16))
    assert z.shape == (B, 16, 1, K)  # MASK column dropped
    np.testing.assert_allclose(z[:, :, 0], full[..., :K], atol=1e-6)
    u = u[..., :K]
    np.testing.assert_allclose(guided[:, :, 0], u + 2.0 * (full[..., :K] - u), atol=1e-4)
    assert np.abs(u - full[..., :K]).max() > 1e-3  # the null class changes the logits
    # The embedding the generator perturbs is the model's own lookup.
    np.testing.assert_allclose(emb, np.asarray(params["tok_emb"]["embedding"])[tokens[..., 0]])
    assert optim.resolve_frozen(params, ("input_embedding", "output_bias", "position_embedding"), a) == [
        "tok_emb", "bias", "pos_emb"]


def test_maskgit_distills_on_8_devices(maskgit):
    m, params = maskgit
    cfg = _config(dropout=0.1)  # Di[M]O keeps dropout in θ and ψ
    d = dimo.Distiller(adapters.make_adapter(m, cfg), cfg, make_mesh(8, fsdp=2))
    tp = d.place_teacher(params)
    state = d.init_state(tp)
    step = distill_stepper(d, tp)
    for i in range(2):
        state, metrics = step(state, i)
    metrics = jax.device_get(metrics)
    for k in ("loss", "gen_loss", "aux_loss", "fkl", "rkl", "gen_grad_norm"):
        assert np.isfinite(metrics[k]), k
    assert metrics["gen_grad_norm"] > 0 and metrics["fkl"] > 0
    _check_moved(params, state.gen_params, {"tok_emb", "bias", "pos_emb"})
    _check_moved(params, state.aux_params, {"tok_emb", "bias", "pos_emb"})
    assert int(state.step) == 2


# ------------------------------------------------------------------------------- MaskGen

T, TW = 6, 16


@pytest.fixture(scope="module")
def text_tower():
    clip = ClipTextTransformer(vocab_size=48, context_length=T, width=TW, heads=2, layers=2, embed_dim=TW,
                               eos_id=45)
    cp = _jit(clip.init)(jax.random.PRNGKey(3), jnp.zeros((1, T), jnp.int32))["params"]
    return clip, cp


@pytest.fixture(scope="module")
def maskgen():
    m = MaskGenVQ(codebook_size=K, seq_len=8, embed_dim=32, depth=1, num_heads=2, text_embed_dim=TW,
                  micro_condition=True, micro_condition_embed_dim=8, condition_num_classes=2)
    params = _jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, T, TW)),
                    jnp.zeros((1, 1, TW)), jnp.full((1,), 6.5))["params"]
    params["embeddings"]["embedding"] = params["embeddings"]["embedding"] * 40.0  # a peaked teacher
    return m, params


def test_prompt_file_reading_sharding_and_batches(tmp_path, text_tower):
    p = tmp_path / "prompts.txt"
    p.write_text("a red cube\n\n  two dogs on a beach  \n\nsoup\n")
    assert prompts.read_prompts(str(p)) == ["a red cube", "two dogs on a beach", "soup"]
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        prompts.read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no captions"):
        prompts.read_prompts(str(tmp_path / "empty.txt"))
    caps = [f"c{i}" for i in range(5)]
    assert prompts.shard_prompts(caps, 0, 2) == ["c0", "c2", "c4"]
    assert prompts.shard_prompts(caps, 1, 2) == ["c1", "c3"]
    with pytest.raises(ValueError, match="at least one caption per host"):
        prompts.shard_prompts(caps[:1], 1, 2)

    clip, cp = text_tower
    table = prompts.load_prompt_conditions(str(p), clip, cp, HashTokenizer(T), chunk=2)
    assert table.condition.shape == (3, T, TW) and table.pooled.shape == (3, 1, TW)
    assert table.null_condition.shape == (1, T, TW) and table.null_pooled.shape == (1, 1, TW)
    # Chunked encoding equals one forward over all captions (+ the null prompt).
    ids = HashTokenizer(T).tokenize(table.captions + [""])
    out = _jit(clip.apply)({"params": cp}, ids)
    np.testing.assert_allclose(table.condition, np.asarray(out.penultimate[:3]), atol=1e-5)
    np.testing.assert_allclose(table.null_pooled, np.asarray(out.pooled[3:]), atol=1e-5)
    fn = table.batch_fn(8, seed=1, process_index=1, process_count=2)
    b0, b0_again, b1 = fn(0), fn(0), fn(1)
    assert b0["condition"].shape == (4, T, TW) and b0["pooled"].shape == (4, 1, TW)
    np.testing.assert_array_equal(b0["condition"], b0_again["condition"])  # pure function of the step
    assert not np.array_equal(b0["condition"], b1["condition"])


@pytest.fixture(scope="module")
def caption_table(text_tower):
    clip, cp = text_tower
    return prompts.encode_prompt_table(clip, cp, HashTokenizer(T), CAPTIONS, null_prompt="", chunk=8)


def test_maskgen_adapter_cfg_uses_null_condition(maskgen, caption_table):
    m, params = maskgen
    tab = caption_table
    cfg = _config(cfg_formula="cond_plus", cfg_scale=3.0)
    with pytest.raises(ValueError, match="null"):
        adapters.make_adapter(m, cfg)
    with pytest.raises(ValueError, match="no dropout"):
        adapters.make_adapter(m, _config(dropout=0.1), **prompts.null_conditions_kwargs(tab))
    a = adapters.make_adapter(m, cfg, **prompts.null_conditions_kwargs(tab))
    assert isinstance(a, adapters.MaskGenAdapter)
    assert (a.num_tokens, a.splits, a.vocab_size, a.mask_token) == (8, 1, K, K)
    batch = tab.batch_fn(B, seed=0)(0)

    @_jit
    def run(params, batch):
        labels, tokens = masking.initial_tokens(jax.random.PRNGKey(1), B, a, 0.5, conditions=batch)
        z = dimo.teacher_cfg_logits(a, params, tokens, labels, 3.0, "cond_plus")
        aes = jnp.full((B,), 6.5)
        c = m.apply({"params": params}, tokens[..., 0], batch["condition"], batch["pooled"], aes)
        null_c = jnp.broadcast_to(tab.null_condition, batch["condition"].shape)
        null_p = jnp.broadcast_to(tab.null_pooled, batch["pooled"].shape)
        u = m.apply({"params": params}, tokens[..., 0], null_c, null_p, aes)
        return labels, z, c, u

    labels, z, c, u = jax.device_get(run(params, batch))
    np.testing.assert_array_equal(labels["condition"], batch["condition"])
    assert z.shape == (B, 8, 1, K)
    np.testing.assert_allclose(z[:, :, 0], c + 3.0 * (c - u), atol=1e-3, rtol=1e-4)
    assert np.abs(c - u).max() > 1e-3  # the null condition changes the logits
    # A table smaller than the batch: rows are drawn from it.
    few = tab.rows(np.arange(3))
    labels = a.draw_labels(jax.random.PRNGKey(2), B, few)
    assert labels["condition"].shape == (B, T, TW) and labels["pooled"].shape == (B, 1, TW)
    with pytest.raises(ValueError, match="conditions"):
        a.draw_labels(jax.random.PRNGKey(2), B, None)
    assert optim.resolve_frozen(params, ("input_embedding", "output_bias", "position_embedding"), a) == [
        "embeddings", "pos_embed"]


def test_maskgen_distills_on_8_devices_from_captions(maskgen, caption_table):
    m, params = maskgen
    cfg = _config(cfg_formula="cond_plus", cfg_scale=3.0, r_init=0.5, sigma_init=0.3)
    a = adapters.make_adapter(m, cfg, **prompts.null_conditions_kwargs(caption_table))
    d = dimo.Distiller(a, cfg, make_mesh(8))
    tp = d.place_teacher(params)
    state = d.init_state(tp)
    batch_fn = caption_table.batch_fn(B, seed=0)
    step = distill_stepper(d, tp)
    for i in range(2):
        conds = jax.device_put(batch_fn(i), meshlib.batch_sharding(d.mesh, 1))
        state, metrics = step(state, i, conds)
    metrics = jax.device_get(metrics)
    for k in ("loss", "gen_loss", "aux_loss", "fkl", "rkl", "gen_grad_norm"):
        assert np.isfinite(metrics[k]), k
    assert metrics["gen_grad_norm"] > 0 and metrics["fkl"] > 0
    # The (last) block's text queries feed only its discarded text output: no gradient.
    unused = ("blocks_0/attn/add_q_proj",)
    _check_moved(params, state.gen_params, {"embeddings", "pos_embed"}, unused)
    _check_moved(params, state.aux_params, {"embeddings", "pos_embed"}, unused)


# ------------------------------------------------------------------------------- entry point


def test_maskgen_entry_distills_from_prompt_file(tmp_path, maskgen, fixtures_dir, monkeypatch):
    """The distill pipeline (python -m softdimo_jax.main): converted MaskGen + text tower, BPE captions from a
    prompt file, the Trainer loop with the conditions batch, checkpoints written."""
    import functools
    import importlib.util
    import os

    from softdimo_jax.runtime.converted import save_converted

    monkeypatch.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=FAST))
    m, params = maskgen
    clip = ClipTextTransformer(context_length=T, width=TW, heads=2, layers=1, embed_dim=TW)
    cp = _jit(clip.init)(jax.random.PRNGKey(4), jnp.zeros((1, T), jnp.int32))["params"]
    save_converted(str(tmp_path / "teacher"), "maskgen_vq", m, params)
    save_converted(str(tmp_path / "clip"), "clip_text", clip, cp)
    (tmp_path / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")

    spec = importlib.util.spec_from_file_location("cfg", "configs/maskgen_t2i_distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("1")
    config.unlock()
    config.update(dict(teacher_checkpoint=str(tmp_path / "teacher"), text_encoder_checkpoint=str(tmp_path / "clip"),
                       bpe_merges=str(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz"),
                       prompt_file=str(tmp_path / "prompts.txt"), prompt_encode_chunk=8))
    config.distill.update(dict(num_steps=2, batch_size=B, compute_dtype="float32", remat=False, lr=1e-3,
                               warmup_steps=1, log_every=1, ckpt_every=2))
    at_scale.distill(config, str(tmp_path / "work"))
    assert sorted(os.listdir(tmp_path / "work" / "distill" / "checkpoints")) == ["2"]

    config.teacher_family = "maskgit_transformer"
    with pytest.raises(ValueError, match="teacher_family"):
        at_scale.distill(config, str(tmp_path / "work2"))
