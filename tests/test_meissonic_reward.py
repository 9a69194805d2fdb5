"""Reward fine-tuning and TTEO of a one-step Meissonic through soft embeddings into its VQ decoder
(core/t2i_reward.py, sampling/t2i_tteo.py, configs/meissonic_t2i_reward.py), on tiny random models:
gradients through the soft VQ decode, a few reward steps on the 8-device mesh, TTEO at fixed
weights, and the distill -> reward pipeline from the tiny preset."""

import functools
import json
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import FAST
from softdimo_jax.core import optim, reward as rewards, t2i_reward
from softdimo_jax.data import prompt_embeddings, prompts
from softdimo_jax.data.clip_bpe import ClipBPETokenizer
from softdimo_jax.models.clip import CLIP
from softdimo_jax.models.meissonic import MeissonicTransformer
from softdimo_jax.models.soft_embed import SoftEmbedder
from softdimo_jax.pipelines import at_scale, meissonic_t2i, phases, t2i
from softdimo_jax.runtime.converted import load_converted, save_converted
from softdimo_jax.runtime.errors import BadInput
from softdimo_jax.runtime.mesh import make_mesh
from softdimo_jax.sampling.meissonic_sampler import meissonic_one_step
from softdimo_jax.sampling.t2i_tteo import make_t2i_tteo_sampler

B = 8
CAPTIONS = ["a red cube", "two dogs on a beach", "a bowl of soup", "snowy mountain at dawn"]
FROZEN = ("embed_embeddings", "embed_layer_norm", "embed_conv", "mlm_conv1", "mlm_layer_norm", "mlm_conv2")


def _config(preset="tiny"):
    c = runpy.run_path("configs/meissonic_t2i_reward.py")["get_config"](preset)
    c.unlock()
    return c


def _tiny_clip():
    m = CLIP(embed_dim=8, image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
             context_length=77, text_width=16, text_heads=2, text_layers=1)
    p = jax.jit(m.init)(jax.random.PRNGKey(5), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 77), jnp.int32))["params"]
    return m, p


def _leaves(tree):
    return {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset's random Meissonic + VQ (4x4 tokens of 16 codes -> 8x8 images), a tiny CLIP
    as the HPS v2 reward, a captioned prompt table with the reward's text features; every jit of
    this module at XLA -O0 (compile time dominates these tiny steps)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=FAST))
        config = _config()
        model, params, (vq, vqp) = meissonic_t2i.random_models(config)
        rset = rewards.build_reward_set({"hps_v2": 1.0}, t2i_reward_models={"hps_v2": _tiny_clip()},
                                        prompt_tokenizer=ClipBPETokenizer())
        arrays = prompt_embeddings.random_prompt_embeddings(len(CAPTIONS), 6, 12, 16, seed=1)
        arrays["captions"] = np.asarray(CAPTIONS)
        table = prompt_embeddings.conditions_from_arrays(arrays, index=0, count=1, require_captions=True)
        table = table.with_extra(reward_text=t2i_reward.prompt_reward_inputs(rset, table.captions))
        plain = make_t2i_tteo_sampler(model, vq, rset, steps=0, grid=tuple(config.distill.token_grid),
                                      mesh=make_mesh(8))  # compiled once
        rows = table.rows(np.arange(B) % len(table))
        yield config, model, params, vq, vqp, rset, table, plain, rows


def test_gradients_through_the_soft_vq_decode_are_finite_and_exact(tiny):
    """Reward of the soft VQ decode as a function of the logits: finite, non-zero gradients that
    match a central finite difference; a one-hot soft decode is the hard decode; (B, L, 1, K)
    logits with the grid equal the (B, H, W, K) layout, and refuse without it."""
    config, model, _, vq, vqp, rset, table, _, rows = tiny
    conds = jax.tree.map(jnp.asarray, table.rows(np.arange(2)))
    emb = SoftEmbedder()
    z = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16))

    def total(z):
        images = t2i_reward.soft_decode_t2i(vq, vqp, emb, z, conds)
        return jnp.sum(rset.total(rset.params, images, conds)[0])

    with jax.default_matmul_precision("highest"):
        g = jax.grad(total)(z)
        assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0
        v = jax.random.normal(jax.random.PRNGKey(1), z.shape)
        v = v / jnp.linalg.norm(v)
        eps = 1e-2
        fd = (total(z + eps * v) - total(z - eps * v)) / (2 * eps)
        np.testing.assert_allclose(float(fd), float(jnp.vdot(g, v)), rtol=5e-2, atol=1e-5)
        flat = t2i_reward.soft_decode_t2i(vq, vqp, emb, z.reshape(2, 16, 1, 16), conds, grid=(4, 4))
        np.testing.assert_allclose(flat, t2i_reward.soft_decode_t2i(vq, vqp, emb, z, conds), atol=1e-6)
        ids = jnp.argmax(z, -1)
        hard = vq.apply({"params": vqp}, ids, method=type(vq).decode_tokens)
        one_hot = vq.apply({"params": vqp}, jax.nn.one_hot(ids, 16), method=type(vq).decode_soft)
        np.testing.assert_allclose(one_hot, hard, atol=1e-5)
    assert flat.shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="grid"):
        t2i_reward.soft_decode_t2i(vq, vqp, emb, z.reshape(2, 16, 1, 16), conds)


def test_tteo_is_the_plain_sampler_at_k0_and_raises_the_reward_at_fixed_weights(tiny):
    config, model, params, vq, vqp, rset, table, plain, rows = tiny
    rng = jax.random.PRNGKey(11)
    out0 = plain(params, vqp, rset.params, rng, rows)
    d = config.distill
    ids, _ = meissonic_one_step(model, params, jnp.asarray(rows["pooled"][:, 0]), jnp.asarray(rows["condition"]), rng,
                                jnp.asarray(d.micro_conds, jnp.float32), grid=tuple(d.token_grid), r_init=0.5,
                                noise_emb_perturb=0.3, temperature=1.0)
    np.testing.assert_array_equal(out0["ids"], ids)  # K = 0, N = 1 is Di[M]O's one-step sampler
    assert out0["images"].shape == (B, 8, 8, 3)
    assert float(out0["images"].min()) >= 0 and float(out0["images"].max()) <= 1
    before = _leaves(params)
    opt = make_t2i_tteo_sampler(model, vq, rset, steps=3, lr=5.0, best_of=2, grid=tuple(d.token_grid),
                                mesh=make_mesh(8))
    out = opt(params, vqp, rset.params, rng, rows)
    np.testing.assert_allclose(out["reward_init"], out0["reward_final"], rtol=1e-4, atol=1e-5)
    r0, r1 = float(jnp.mean(out["reward_init"])), float(jnp.mean(out["reward_final"]))
    print(f"TTEO (K = 3, lr 5, best of 2) soft reward {r0:.5f} -> {r1:.5f}")
    assert r1 > r0 + 1e-3, (r0, r1)
    assert opt.cost == {"forward": 8, "backward": 6, "plain_forward": 1, "relative": 20}
    for k, v in _leaves(params).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    with pytest.raises(ValueError, match="token grid"):
        make_t2i_tteo_sampler(model, vq, rset, steps=1)
    with pytest.raises(ValueError, match="8 codes but the generator predicts 16"):
        make_t2i_tteo_sampler(model, vq.clone(num_vq_embeddings=8), rset, steps=1, grid=(4, 4))


def test_tiny_preset_distill_then_reward_raises_the_reward_on_8_devices(tmp_path, monkeypatch, capsys, tiny):
    """configs/meissonic_t2i_reward.py:tiny after the distill tiny preset in one workdir (8 devices,
    FSDP 2): refuses without a reward; a few reward steps with finite losses raise the soft reward of
    the one-step student on fixed rows; the frozen models (teacher, VQ, reward: non-donated arguments)
    are unchanged and the frozen groups of θ equal the teacher's; the student is exported and the
    one-step and TTEO grids written with the soft reward before / after; an .npz without captions is
    refused in one line."""
    _, _, _, vq, vqp, rset, _, plain, _ = tiny
    monkeypatch.setattr(phases, "step_compiler_options", lambda dcfg: FAST)
    runs = []
    train = phases.train_refinement
    monkeypatch.setattr(phases, "train_refinement", lambda *a, **k: runs.append((train(*a, **k), k)) or runs[-1][0])
    clip, cp = _tiny_clip()  # clip_score here = the fixture's hps_v2 (same tower, both the plain cosine)
    save_converted(str(tmp_path / "clip"), "openclip", clip, cp)
    config = _config()
    config.distill.update(dict(num_steps=1, fsdp=2))
    config.reward.num_steps = 6
    config.grid_samples = 0
    work = str(tmp_path / "work")
    with pytest.raises(ValueError, match="every weight of config.reward.rewards is 0"):
        t2i.t2i_reward(config, work)
    at_scale.distill(config, work)
    config.reward.rewards.clip_score = 1.0
    config.reward_checkpoints.clip_score = str(tmp_path / "clip")
    t2i.t2i_reward(config, work)
    ((result, kw),) = runs
    assert int(result.state.step) == 6 and len(result.history) == 6
    for h in result.history:
        assert all(np.isfinite(h[k]) for k in ("loss", "gen_loss", "aux_loss", "fkl", "reward",
                                               "reward_clip_score")), h

    # The soft reward of the distilled vs the reward-tuned student on the pipeline's own rows.
    model, teacher, (_, vq_init) = meissonic_t2i.random_models(config)
    table = meissonic_t2i.prompt_table(config, model)
    table = table.with_extra(reward_text=t2i_reward.prompt_reward_inputs(rset, table.captions))
    rows = table.rows(np.arange(B) % len(table))
    soft = lambda gp: float(jnp.mean(plain(gp, vq_init, rset.params, jax.random.PRNGKey(7), rows)["reward_final"]))
    tuned_model, tuned = load_converted(os.path.join(work, "reward", "student"))
    assert isinstance(tuned_model, MeissonicTransformer)
    before, after = soft(load_converted(os.path.join(work, "distill", "student"))[1]), soft(tuned)
    assert after > before + 1e-3, (before, after)
    # Frozen models unchanged and alive; θ's frozen groups (Di[M]O's fix_emb_layer) are the teacher's.
    want = {"teacher": _leaves(teacher), "tokenizer": _leaves(vq_init), "reward": _leaves(rset.params)}
    for name, leaves in want.items():
        got = _leaves(jax.device_get(kw["frozen"][name]))
        assert got.keys() == leaves.keys(), name
        for k, v in leaves.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{name} {k}")
    gen = _leaves(result.state.gen_params)
    t = want["teacher"]
    for k in t:
        if k.split("/")[0] in FROZEN:
            np.testing.assert_array_equal(gen[k], t[k], err_msg=k)
    assert any(not np.array_equal(gen[k], t[k]) for k in t if k.split("/")[0] not in FROZEN)

    assert sorted(os.listdir(os.path.join(work, "reward", "checkpoints")))[-1] == "6"
    for grid in ("student_hard.png", "tteo_k1.png"):
        assert os.path.getsize(os.path.join(work, "reward", grid)) > 0
    lines = [l for l in capsys.readouterr().err.splitlines() if "[reward] tteo_k1: " in l]
    stats = json.loads(lines[-1].split("tteo_k1: ", 1)[1])
    assert stats["steps"] == 1 and stats["forward"] == 2 and stats["backward"] == 1
    assert all(np.isfinite(stats[k]) for k in ("soft_reward_before", "soft_reward_after"))
    print(f"soft reward of the one-step student: distilled {before:.5f} -> reward-tuned {after:.5f}")

    arrays = prompt_embeddings.random_prompt_embeddings(4, 6, 12, 16)
    del arrays["captions"]
    np.savez(tmp_path / "p.npz", **arrays)
    config.prompt_embeddings = str(tmp_path / "p.npz")
    with pytest.raises(BadInput, match="captions") as e:
        meissonic_t2i.reward_prompt_table(config, model)
    assert "\n" not in str(e.value)
