"""GAN refinement: discriminator heads, masking, discriminator learning, generator gradient
through the frozen teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.models.discriminator import FeatureDiscriminator, fourier_features, init_discriminator
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.training import gan
from softdimo_jax.training.refine_config import default_gan_config

L, BITS, S = 16, 6, 2


def tiny_teacher():
    return LFQBert(num_tokens=L, num_bits=BITS, splits=S, hidden_dim=32, depth=2, heads=2,
                   mlp_dim=64, num_classes=4, dropout=0.0)


def test_random_position_mask_exact_counts():
    mask, r = gan.random_position_mask(jax.random.PRNGKey(0), 64, L, 0.95)
    counts = np.asarray(mask.sum(-1))
    np.testing.assert_allclose(np.asarray(r) * L, counts)
    assert counts.max() <= round(0.95 * L) and counts.min() >= 0
    assert len(set(counts.tolist())) > 3  # r varies per sample
    with pytest.raises(ValueError, match="r_max"):
        gan.random_position_mask(jax.random.PRNGKey(0), 2, L, 1.0)


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
    m_r, r_r = gan.random_position_mask(k[4], 16, L, 0.95)
    m_f, r_f = gan.random_position_mask(k[5], 16, L, 0.95)
    f_real = gan.teacher_features(teacher, t_params, gan.mask_positions(real, m_r), labels)
    f_fake = gan.teacher_features(teacher, t_params, gan.mask_positions(fake, m_f), labels)

    disc = FeatureDiscriminator(layers=cfg.disc_layers, num_tokens=L, num_classes=4, hidden_dim=32)
    tx = gan.make_disc_optimizer(cfg)
    state = gan.init_disc_state(init_discriminator(disc, jax.random.PRNGKey(3), f_real, 16), tx)
    update = jax.jit(gan.disc_update(disc, tx, cfg))
    losses = []
    for _ in range(40):
        state, m = update(state, f_real, r_r, f_fake, r_f, labels)
        losses.append(float(m["disc_bce"]))
        assert np.isfinite(float(m["disc_loss"]))
    assert losses[-1] < 0.6 * losses[0], losses
    assert float(m["disc_acc"]) > 0.9
