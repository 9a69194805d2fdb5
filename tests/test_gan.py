"""GAN refinement: discriminator heads, masking, discriminator learning, generator gradient
through the frozen teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.models.discriminator import FeatureDiscriminator, fourier_features, init_discriminator
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.core import gan, masking
from softdimo_jax.core.defaults import default_gan_config

L, BITS, S = 16, 6, 2


def tiny_teacher(depth=2):
    return LFQBert(num_tokens=L, num_bits=BITS, splits=S, hidden_dim=32, depth=depth, heads=2,
                   mlp_dim=64, num_classes=4, dropout=0.0)


def test_random_position_mask_exact_counts():
    mask, r = masking.random_position_mask(jax.random.PRNGKey(0), 64, L, 0.95)
    counts = np.asarray(mask.sum(-1))
    np.testing.assert_allclose(np.asarray(r) * L, counts)
    assert counts.max() <= round(0.95 * L) and counts.min() >= 0
    assert len(set(counts.tolist())) > 3  # r varies per sample
    with pytest.raises(ValueError, match="r_max"):
        masking.random_position_mask(jax.random.PRNGKey(0), 2, L, 1.0)


def test_real_bits_match_teacher_split_bits():
    idx = jax.random.randint(jax.random.PRNGKey(1), (2, 4, 4), 0, 2**BITS)
    model = tiny_teacher()
    from softdimo_jax.models import lfq
    sub = lfq.split_indices(idx.reshape(2, L), BITS, S)
    np.testing.assert_array_equal(gan.real_bits_from_indices(idx, BITS), model.tokens_to_bits(sub))


def test_discriminator_shapes_and_errors():
    feats = tuple(jnp.ones((3, L + 1, 32)) * i for i in range(2))
    disc = FeatureDiscriminator(layers=(0, -1), num_tokens=L, num_classes=4, hidden_dim=16)
    params = init_discriminator(disc, jax.random.PRNGKey(0), feats, 3)
    out = disc.apply({"params": params}, feats, jnp.zeros((3,)), jnp.zeros((3,), jnp.int32))
    assert out.shape == (3, 2)
    bad = FeatureDiscriminator(layers=(5,), num_tokens=L, num_classes=4, hidden_dim=16)
    with pytest.raises(ValueError, match="out of range"):
        init_discriminator(bad, jax.random.PRNGKey(0), feats, 3)
    assert fourier_features(jnp.array([0.0, 0.5]), 8).shape == (2, 8)


@pytest.mark.parametrize("reg", ["none", "r1", "lecam"])
def test_discriminator_loss_goes_down_on_fixed_toy_set(reg):
    # Fixed real/fake sets: real = random ±1 bits, fake = soft bits shrunk toward 0, both
    # masked with r ~ U[0, 0.95] and passed through a frozen random teacher.
    cfg = default_gan_config()
    cfg.disc_layers = (0, 1)
    cfg.disc_hidden = 32
    cfg.disc_lr = 3e-3
    cfg.disc_reg = reg
    teacher = tiny_teacher()
    k = jax.random.split(jax.random.PRNGKey(2), 6)
    labels = jax.random.randint(k[0], (16,), 0, 4)
    t_params = teacher.init(k[1], labels=labels, input_bits=jnp.zeros((16, L, BITS)))["params"]
    real = jnp.sign(jax.random.normal(k[2], (16, L, BITS)))
    fake = 0.4 * jnp.tanh(jax.random.normal(k[3], (16, L, BITS)))
    m_r, r_r = masking.random_position_mask(k[4], 16, L, 0.95)
    m_f, r_f = masking.random_position_mask(k[5], 16, L, 0.95)
    f_real = gan.teacher_features(teacher, t_params, masking.mask_positions(real, m_r), labels)
    f_fake = gan.teacher_features(teacher, t_params, masking.mask_positions(fake, m_f), labels)

    disc = FeatureDiscriminator(layers=cfg.disc_layers, num_tokens=L, num_classes=4, hidden_dim=32)
    tx = gan.make_disc_optimizer(cfg)
    state = gan.init_disc_state(init_discriminator(disc, jax.random.PRNGKey(3), f_real, 16), tx)
    update = jax.jit(gan.disc_update(disc, tx, cfg))
    losses = []
    for _ in range(40):
        state, m = update(state, f_real, r_r, labels, f_fake, r_f, labels)
        losses.append(float(m["disc_bce"]))
        assert np.isfinite(float(m["disc_loss"]))
    assert losses[-1] < 0.6 * losses[0], losses
    assert float(m["disc_acc"]) > 0.9


def _setup(w_gan=200.0, w_dimo=1.0, soft_mode="soft"):
    from softdimo_jax.core.adapters import make_adapter
    from softdimo_jax.core.defaults import default_distill_config
    from softdimo_jax.runtime import mesh as meshlib

    dcfg = default_distill_config()
    dcfg.batch_size = 4
    dcfg.dropout = 0.0
    gcfg = default_gan_config()
    gcfg.batch_size = 4
    gcfg.w_gan, gcfg.w_dimo, gcfg.soft_mode = w_gan, w_dimo, soft_mode
    gcfg.disc_layers = (0,)
    gcfg.disc_hidden = 16
    gcfg.gen_lr = 1e-3
    gcfg.gen_warmup_steps = 0
    model = tiny_teacher(depth=1)
    adapter = make_adapter(model, dcfg)
    refiner = gan.GanRefiner(adapter, dcfg, gcfg, mesh=meshlib.make_mesh(1))
    t_params = model.init(jax.random.PRNGKey(0), labels=jnp.zeros((1,), jnp.int32),
                          input_bits=jnp.zeros((1, L, BITS)))["params"]
    dimo = refiner.distiller.init_state(t_params)
    state = refiner.init_state(jax.random.PRNGKey(1), dimo, t_params)
    return refiner, t_params, state


def _gen_grads(refiner, t_params, state, rng):
    d = refiner.distiller

    @jax.jit
    def run(state, t_params, rng):
        extra = lambda z, y, k: refiner._fake_loss(state.disc.params, t_params, z, y, k)
        grads, cot, z, stats, _ = d.generator_cotangent(state.dimo, t_params, rng, extra_loss=extra)
        return grads, stats

    return run(state, t_params, rng)


@pytest.mark.parametrize("soft_mode", ["soft", "gumbel_st"])
def test_gan_gradient_reaches_generator_through_frozen_teacher(soft_mode):
    refiner, t_params, state = _setup(w_gan=1.0, w_dimo=0.0, soft_mode=soft_mode)
    grads, stats = _gen_grads(refiner, t_params, state, jax.random.PRNGKey(5))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for _, g in leaves)
    # Every transformer layer of the generator receives a GAN gradient (via soft bits ->
    # teacher -> heads), and the GAN loss is the only term (w_dimo = 0).
    layer_norm = float(optax_global_norm(grads["layer_0"]))
    assert layer_norm > 1e-8, layer_norm
    assert float(stats["extra_cot_norm"]) > 0
    if soft_mode != "soft":
        return
    # Switching the GAN weight off leaves no gradient at all.
    refiner0, _, _ = _setup(w_gan=0.0, w_dimo=0.0, soft_mode=soft_mode)
    grads0, _ = _gen_grads(refiner0, t_params, state, jax.random.PRNGKey(5))
    assert float(optax_global_norm(grads0)) == 0.0


def optax_global_norm(tree):
    import optax
    return optax.global_norm(tree)


def test_gan_step_moves_generator_and_disc_not_teacher():
    refiner, t_params, state0 = _setup()
    t_before = jax.tree.map(np.array, t_params)
    gen_before = jax.tree.map(np.array, state0.dimo.gen_params)
    disc_before = jax.tree.map(np.array, state0.disc.params)
    step = jax.jit(refiner.trainer_step_fn(), donate_argnums=(0,))
    idx = jax.random.randint(jax.random.PRNGKey(3), (4, L), 0, 2**BITS)
    batch = {"indices": idx, "labels": jnp.arange(4) % 4}
    state, m = step(state0, batch, jax.random.PRNGKey(4), 0, {"teacher": t_params})
    for k in ("loss", "disc_loss", "gan_g_loss", "fkl", "aux_loss"):
        assert np.isfinite(float(m[k])), k
    jax.tree.map(np.testing.assert_array_equal, t_before, jax.tree.map(np.array, t_params))
    moved = lambda a, b: any(not np.array_equal(x, np.asarray(y)) for x, y in
                             zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert moved(gen_before, state.dimo.gen_params)
    assert moved(disc_before, state.disc.params)
    # Frozen generator parameters (input projection) did not move.
    np.testing.assert_array_equal(gen_before["input_proj"]["kernel"],
                                  np.asarray(state.dimo.gen_params["input_proj"]["kernel"]))
    assert int(state.dimo.step) == 1
