"""Di[M]O distillation step (SPEC §1.1) on a tiny LFQBert teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.runtime.mesh import make_mesh
from helpers import FAST, distill_stepper
from softdimo_jax.core import adapters, dimo, masking, optim
from softdimo_jax.core.defaults import default_distill_config

L, S, BITS, B = 16, 2, 4, 8
V = 2 ** (BITS // S)


def _model():
    return LFQBert(num_tokens=L, num_bits=BITS, splits=S, hidden_dim=32, depth=1, heads=2,
                   mlp_dim=64, num_classes=3, dropout=0.1)


@pytest.fixture(scope="module")
def teacher():
    m = _model()
    params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, L, S), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]
    # A peaked teacher so the divergences are not trivially small.
    params["prediction"]["kernel"] = params["prediction"]["kernel"] * 8.0
    return m, params


def _config(**kw):
    c = default_distill_config()
    c.batch_size = B
    c.lr = 3e-3
    c.warmup_steps = 1
    c.dropout = 0.0
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def one_device(teacher):
    m, params = teacher
    cfg = _config()
    d = dimo.Distiller(adapters.make_adapter(m, cfg), cfg, make_mesh(1))
    return d, d.place_teacher(params)


# ---------------------------------------------------------------- the gradient on the logits


def _logits(seed, shape=(B, L, S, V), scale=2.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_fkl_gradient_is_closed_form():
    z_t, z_a = _logits(1), _logits(2)
    mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.5, (B, L, S))
    g = dimo.jeffreys_grad(z_t, z_a, mask, beta=0.0)
    want = jax.nn.softmax(z_a) - jax.nn.softmax(z_t)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jnp.where(mask[..., None], want, 0.0)), atol=1e-6)
    # It is the gradient of the masked forward KL(p_T || softmax(z)) at z = z_A.
    fkl = lambda z: jnp.sum(mask * jnp.sum(jax.nn.softmax(z_t) * (jax.nn.log_softmax(z_t) - jax.nn.log_softmax(z)), -1))
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(fkl)(z_a)), atol=1e-6)
    assert float(jnp.abs(g).max()) > 1e-2


def test_rkl_gradient_is_autodiff_of_reverse_kl():
    z_t, z_a = _logits(4), _logits(5)
    mask = jax.random.bernoulli(jax.random.PRNGKey(6), 0.5, (B, L, S))
    rkl = lambda z: jnp.sum(mask * jnp.sum(jax.nn.softmax(z) * (jax.nn.log_softmax(z) - jax.nn.log_softmax(z_t)), -1))
    g1 = dimo.jeffreys_grad(z_t, z_a, mask, beta=1.0)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(jax.grad(rkl)(z_a)), atol=1e-5)
    # Generalised Jeffreys: linear in beta between the two.
    g0 = dimo.jeffreys_grad(z_t, z_a, mask, beta=0.0)
    g3 = dimo.jeffreys_grad(z_t, z_a, mask, beta=0.3)
    np.testing.assert_allclose(np.asarray(g3), np.asarray(0.7 * g0 + 0.3 * g1), atol=1e-6)


def test_gradient_zero_unmasked_and_nonfinite_dropped():
    z_t = _logits(7).at[0, 0, 0, 1].set(-jnp.inf).at[1, 2, 1, :].set(jnp.nan)
    z_a = _logits(8)
    mask = jnp.ones((B, L, S), bool).at[0, 3].set(False)
    for beta in (0.0, 0.5, 1.0):
        g = dimo.jeffreys_grad(z_t, z_a, mask, beta)
        assert bool(jnp.all(jnp.isfinite(g)))
        np.testing.assert_array_equal(np.asarray(g[0, 3]), 0.0)
        np.testing.assert_array_equal(np.asarray(g[1, 2, 1]), 0.0)


def test_generator_gradient_is_vjp_of_g_over_batch(one_device):
    """The step's generator gradient equals the gradient of the reference's surrogate loss
    0.5·Σ(z_θ − sg(z_θ − g))²/B, whose derivative w.r.t. z_θ is the cotangent g/B, and
    that cotangent is (p_A − p_T)/B on masked positions, zero elsewhere (beta = 0)."""
    d, tparams = one_device
    state = d.init_state(tparams)
    rng = jax.random.PRNGKey(11)

    def both(state, tparams):
        grads, cot, _, _, _ = d.generator_cotangent(state, tparams, rng)
        # Recompute the same z_θ (same rng split as generator_cotangent) and the surrogate.
        k_in, k_drop, *_ = jax.random.split(rng, 5)
        labels, tokens, k_eps = d.generator_inputs(state.gen_params, k_in, B)
        g = cot * B

        def surrogate(p):
            zz = d.generator_logits(p, labels, tokens, k_eps, k_drop)
            return 0.5 * jnp.sum((zz - jax.lax.stop_gradient(zz - g)) ** 2) / B

        return grads, g, jax.grad(surrogate)(state.gen_params)

    grads, g, want = jax.jit(both, compiler_options=FAST)(state, tparams)
    assert g.shape == (B, L, S, V)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    # Rows of g: either all zero (unmasked) or summing to zero with mass (masked, FKL).
    rows = np.abs(np.asarray(g)).sum(-1)
    assert (rows == 0).any() and (rows > 1e-4).any()
    np.testing.assert_allclose(np.asarray(g).sum(-1), 0.0, atol=1e-5)
    # Each masked row is a difference of two distributions: |g| sums to at most 2.
    assert rows.max() <= 2.0 + 1e-5


# ---------------------------------------------------------------- masking, CFG, EMA


def test_initial_state_and_forward_mask_exact_counts(teacher):
    m, _ = teacher
    a = adapters.make_adapter(m, _config())
    labels, tokens = masking.initial_tokens(jax.random.PRNGKey(0), 64, a, r_init=0.6)
    k0 = round(0.6 * L)
    is_mask = np.asarray(tokens == a.mask_token)
    np.testing.assert_array_equal(is_mask.sum(1), k0)  # per sample and per split
    assert (is_mask[..., 0] == is_mask[..., 1]).all()  # per position: all splits together
    assert int(labels.min()) >= 0 and int(labels.max()) < 3
    assert int(tokens[~is_mask].max()) < V

    for mode in ("position", "split"):
        msk = np.asarray(masking.forward_mask(jax.random.PRNGKey(1), 256, L, S, "arccos", mode))
        counts = msk.sum(1)  # (B, S)
        assert counts.min() >= 1 and counts.max() <= L
        np.testing.assert_array_equal(counts[:, 0], counts[:, 1])  # same k in every split
        same = (msk[..., 0] == msk[..., 1]).all()
        assert same if mode == "position" else not same
    # arccos: E[r] = 2/pi·∫arccos = 2/pi ≈ 0.64.
    msk = np.asarray(masking.forward_mask(jax.random.PRNGKey(2), 4096, L, S, "arccos", "position"))
    assert abs(msk.mean() - 2 / np.pi) < 0.02


def test_cfg_formulas(teacher):
    m, params = teacher
    a = adapters.make_adapter(m, _config())
    c, u = jnp.array([2.0, 1.0]), jnp.array([1.0, 3.0])
    np.testing.assert_allclose(np.asarray(dimo.cfg_combine(c, u, 2.0, "uncond_plus")), [3.0, -1.0])
    np.testing.assert_allclose(np.asarray(dimo.cfg_combine(c, u, 2.0, "cond_plus")), [4.0, -3.0])
    with pytest.raises(ValueError, match="cfg_formula"):
        dimo.cfg_combine(c, u, 1.0, "nope")
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, L, S), 0, V + 1)
    y = jnp.array([0, 2])
    zc = m.apply({"params": params}, tokens, y)
    zu = m.apply({"params": params}, tokens, y, drop_label_mask=jnp.ones(2, bool))
    got = dimo.teacher_cfg_logits(a, params, tokens, y, 2.0, "uncond_plus")
    np.testing.assert_allclose(np.asarray(got), np.asarray(zu + 2.0 * (zc - zu)), atol=1e-4)
    got = dimo.teacher_cfg_logits(a, params, tokens, y, 0.5, "cond_plus")
    np.testing.assert_allclose(np.asarray(got), np.asarray(zc + 0.5 * (zc - zu)), atol=1e-4)


def test_ema_rate_and_frozen_names(teacher):
    np.testing.assert_allclose(float(optim.ema_rate(0, 0.9999)), 0.1)
    np.testing.assert_allclose(float(optim.ema_rate(90, 0.9999)), 91 / 100)
    np.testing.assert_allclose(float(optim.ema_rate(10**7, 0.9999)), 0.9999)
    m, params = teacher
    a = adapters.make_adapter(m, _config())
    pats = optim.resolve_frozen(params, ("input_embedding", "output_bias", "position_embedding"), a)
    assert pats == ["input_proj", "prediction/bias", "pos_emb"]
    labels = optim.frozen_labels(params, pats)
    assert labels["prediction"] == {"bias": "frozen", "kernel": "trainable"}
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.resolve_frozen(params, ("token_embedding",), a)


# ---------------------------------------------------------------- the jitted step


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_frozen_params_never_move_and_others_do(teacher, one_device):
    _, params = teacher
    d, tparams = one_device
    state = d.init_state(tparams)
    step = distill_stepper(d, tparams)
    for i in range(2):
        state, metrics = step(state, i)
    assert int(state.step) == 2
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["gen_grad_norm"]) > 0 and float(metrics["aux_grad_norm"]) > 0
    t = _leaves(params)
    frozen = ("['input_proj']", "['pos_emb']", "['prediction']['bias']")
    for name in ("gen_params", "aux_params", "ema_params"):
        got = _leaves(getattr(state, name))
        for k, v in got.items():
            if k.startswith(frozen):
                np.testing.assert_array_equal(v, t[k], err_msg=f"{name}{k} moved")
        moved = [k for k, v in got.items() if not k.startswith(frozen) and not np.array_equal(v, t[k])]
        assert len(moved) >= len(got) - 3 - 4, (name, moved)  # nearly every trainable leaf moved


def test_mesh_step_equals_single_device(teacher, one_device):
    """8 devices (data 4 × fsdp 2) give the same iteration as 1 device."""
    m, params = teacher
    d1, t1 = one_device
    cfg = _config()
    d8 = dimo.Distiller(adapters.make_adapter(m, cfg), cfg, make_mesh(8, fsdp=2))
    t8 = d8.place_teacher(params)
    s1, m1 = distill_stepper(d1, t1)(d1.init_state(t1), 9)
    s8, m8 = distill_stepper(d8, t8)(d8.init_state(t8), 9)
    assert len(s8.gen_params["layer_0"]["mlp_fc1"]["kernel"].sharding.device_set) == 8
    for k in m1:
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=2e-4, atol=1e-6, err_msg=k)
    a, b = _leaves(s1), _leaves(s8)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=2e-6, err_msg=k)


def test_resume_is_exact(tmp_path, one_device):
    d, tparams = one_device
    step = distill_stepper(d, tparams)
    s = d.init_state(tparams)
    s, _ = step(s, 0)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "s1", s)
    ckpt.wait_until_finished()
    s, _ = step(s, 1)
    uninterrupted = _leaves(s)

    restored = ckpt.restore(tmp_path / "s1", d.abstract_state(tparams))
    assert int(restored.step) == 1
    resumed, _ = step(restored, 1)
    got = _leaves(resumed)
    for k in uninterrupted:
        np.testing.assert_array_equal(got[k], uninterrupted[k], err_msg=k)


# ---------------------------------------------------------------- Trainer integration and sampling


def test_trainer_stage_runs_resumes_and_samples(tmp_path, teacher, monkeypatch):
    """train_distill through the shared Trainer: checkpoints, and a complete run restores
    instead of retraining; the one-step sampler reads the EMA weights."""
    import functools

    # Compile time dominates here: every jit of this test at XLA optimisation level 0.
    monkeypatch.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=FAST))
    from softdimo_jax.models.soft_embed import expected_bits
    from softdimo_jax.sampling import student
    from softdimo_jax.pipelines.phases import train_distill

    m, params = teacher
    cfg = _config(num_steps=2, ckpt_every=1, log_every=1)
    mesh = make_mesh(2)
    res, d = train_distill(cfg, m, params, str(tmp_path / "distill"), mesh)
    assert res.trained and res.step == 2 and int(res.state.step) == 2
    assert {"loss", "fkl", "aux_loss"} <= set(res.history[-1])
    again, _ = train_distill(cfg, m, params, str(tmp_path / "distill"), mesh)
    assert not again.trained
    for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(again.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    ema = dimo.generator_params(again.state)
    assert ema is again.state.ema_params
    labels = jnp.arange(4) % 3
    hard = student.sampler_from_config(m, cfg, "hard", mesh)(ema, jax.random.PRNGKey(0), labels)["tokens"]
    assert hard.shape == (4, L, S) and int(hard.min()) >= 0 and int(hard.max()) < V
    soft = student.sampler_from_config(m, cfg, "soft", mesh)(ema, jax.random.PRNGKey(0), labels)["bits"]
    assert soft.shape == (4, L, BITS) and float(jnp.abs(soft).max()) <= 1.0 + 1e-6  # expectation of ±1 bits, up to f32 round-off
    # The soft sample is the expectation of the same logits the hard sample is drawn from.
    a = adapters.LFQBertAdapter.from_module(m, dropout=0.0)
    z = student.one_step_logits(a, ema, jax.random.split(jax.random.PRNGKey(0))[0], labels)
    np.testing.assert_allclose(np.asarray(soft), np.asarray(expected_bits(jax.nn.softmax(z))), atol=1e-5)
