"""Reward registry, reward fine-tuning (gradient through the frozen decoder) and TTEO."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softdimo_jax.evaluation.digits_classifier import DigitsClassifier
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.models.maskbit_tokenizer import ConvVQModel
from softdimo_jax.core import reward as rewards

L, BITS, S, GRID = 16, 6, 2, (4, 4)


def tiny_models():
    gen = LFQBert(num_tokens=L, num_bits=BITS, splits=S, hidden_dim=32, depth=1, heads=2, mlp_dim=64,
                  num_classes=10, dropout=0.0)
    tok = ConvVQModel(num_bits=BITS, hidden_channels=32, channel_mult=(1, 1), num_res_blocks=1, num_channels=1)
    clf = DigitsClassifier(num_classes=10, width=8, feature_dim=16, image_size=8)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    gp = gen.init(k[0], labels=jnp.zeros((1,), jnp.int32), input_bits=jnp.zeros((1, L, BITS)))["params"]
    tp = tok.init(k[1], jnp.zeros((1, 8, 8, 1)))["params"]
    cp = clf.init(k[2], jnp.zeros((1, 8, 8, 1)))["params"]
    rset = rewards.build_reward_set(
        {"digits_classifier_logprob": 1.0},
        classifier_apply=lambda p, x: clf.apply({"params": p}, x), classifier_params=cp)
    return gen, gp, tok, tp, clf, cp, rset


def test_reward_registry_and_digits_logprob():
    gen, gp, tok, tp, clf, cp, rset = tiny_models()
    assert "digits_classifier_logprob" in rewards.available_rewards()
    with pytest.raises(KeyError, match="unknown reward"):
        rewards.build_reward("clip_score_nope")
    with pytest.raises(ValueError, match="classifier_apply"):
        rewards.build_reward("digits_classifier_logprob")
    images = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1))
    labels = jnp.array([0, 3, 7, 9])
    total, parts = rset.total(rset.params, images, labels)
    want = jax.nn.log_softmax(clf.apply({"params": cp}, images))[jnp.arange(4), labels]
    np.testing.assert_allclose(total, want, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"digits_classifier_logprob"}
    # A composite: weights multiply, and a reward must return (B,).
    two = rewards.build_reward_set([("digits_classifier_logprob", 0.5), ("brightness", 2.0)],
                                   classifier_apply=lambda p, x: clf.apply({"params": p}, x),
                                   classifier_params=cp)
    t2, _ = two.total(two.params, images, labels)
    np.testing.assert_allclose(t2, 0.5 * want + 2.0 * images.mean((1, 2, 3)), rtol=1e-5, atol=1e-6)
    # Per-reward options: a tempered log-probability.
    tempered = rewards.build_reward_set(
        {"digits_classifier_logprob": {"weight": 2.0, "temperature": 4.0}},
        classifier_apply=lambda p, x: clf.apply({"params": p}, x), classifier_params=cp)
    t3, _ = tempered.total(tempered.params, images, labels)
    want_t = jax.nn.log_softmax(clf.apply({"params": cp}, images) / 4.0)[jnp.arange(4), labels]
    np.testing.assert_allclose(t3, 2.0 * want_t, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        rewards.build_reward_set({"brightness": {"temperature": 2.0}})
    bad = rewards.RewardSet((rewards.Reward("bad", lambda p, x, c: x.mean(), {}),), (1.0,))
    with pytest.raises(ValueError, match="one\nscalar per image|one scalar per image"):
        bad.total(bad.params, images, labels)


def _reward_refiner(w=1.0, w_dimo=0.0):
    from softdimo_jax.core.adapters import make_adapter
    from softdimo_jax.core.defaults import default_distill_config, default_reward_config
    from softdimo_jax.runtime import mesh as meshlib

    gen, gp, tok, tp, clf, cp, rset = tiny_models()
    dcfg = default_distill_config()
    dcfg.batch_size, dcfg.dropout = 4, 0.0
    rcfg = default_reward_config()
    rcfg.batch_size, rcfg.w_reward, rcfg.w_dimo, rcfg.gen_lr, rcfg.gen_warmup_steps = 4, w, w_dimo, 1e-3, 0
    ref = rewards.RewardRefiner(make_adapter(gen, dcfg), dcfg, rcfg, tok, rset, GRID,
                        mesh=meshlib.make_mesh(1))
    state = ref.init_state(ref.distiller.init_state(gp))
    frozen = {"teacher": gp, "tokenizer": tp, "reward": rset.params}
    return ref, state, frozen


def test_reward_gradient_reaches_generator_through_decoder_and_frozen_weights_stay():
    ref, state, frozen = _reward_refiner(w=1.0, w_dimo=0.0)
    d = ref.distiller

    @jax.jit
    def grads_of(state, frozen, rng):
        extra = lambda z, y, k: ref.reward_loss(frozen["tokenizer"], frozen["reward"], z, y, k)
        return d.generator_cotangent(state, frozen["teacher"], rng, extra_loss=extra)

    grads, _, _, stats, _ = grads_of(state, frozen, jax.random.PRNGKey(3))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert float(optax.global_norm(grads["layer_0"])) > 1e-8
    assert np.isfinite(float(stats["reward"]))

    # A full jitted phase step: the generator moves, teacher / tokenizer / reward weights do not.
    before = jax.tree.map(np.array, frozen)
    gen_before = jax.tree.map(np.array, state.gen_params)
    step = jax.jit(ref.trainer_step_fn(), donate_argnums=(0,))
    new, m = step(state, None, jax.random.PRNGKey(4), 0, frozen)
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["reward"]))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, frozen))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(gen_before), jax.tree.leaves(new.gen_params)))


def test_tteo_k0_equals_plain_sampling_and_optimisation_raises_reward():
    from softdimo_jax.sampling.student import make_student_sampler
    from softdimo_jax.sampling.tteo import make_tteo_sampler, tteo_cost

    gen, gp, tok, tp, clf, cp, rset = tiny_models()
    labels = jnp.arange(8) % 10
    rng = jax.random.PRNGKey(7)
    plain = make_student_sampler(gen, mode="hard", temperature=1.0)(gp, rng, labels)
    t0 = make_tteo_sampler(gen, tok, rset, grid=GRID, steps=0)
    out0 = t0(gp, tp, rset.params, rng, labels)
    np.testing.assert_array_equal(out0["tokens"], plain["tokens"])
    np.testing.assert_allclose(out0["reward_init"], out0["reward_final"])
    assert t0.cost == tteo_cost(0, 1) and t0.cost["forward"] == 1 and t0.cost["backward"] == 0

    # K SGD steps at a small lr raise the soft reward of every image (a gradient step on a
    # smooth objective); the weights are untouched (plain arrays, nothing donated).
    tk = make_tteo_sampler(gen, tok, rset, grid=GRID, steps=3, lr=0.05)
    outk = tk(gp, tp, rset.params, rng, labels)
    np.testing.assert_allclose(outk["reward_init"], out0["reward_init"], rtol=1e-4, atol=1e-5)
    assert float(jnp.mean(outk["reward_final"])) > float(jnp.mean(outk["reward_init"]))
    assert tk.cost["forward"] == 4 and tk.cost["backward"] == 3

    # Best-of-N keeps the plain candidate among its N, so per image it never loses.
    tn = make_tteo_sampler(gen, tok, rset, grid=GRID, steps=0, best_of=4)
    outn = tn(gp, tp, rset.params, rng, labels)
    assert np.all(np.asarray(outn["reward_final"]) >= np.asarray(out0["reward_final"]) - 1e-6)
    with pytest.raises(ValueError, match="best_of"):
        make_tteo_sampler(gen, tok, rset, grid=GRID, best_of=17)
