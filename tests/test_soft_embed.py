"""Soft embeddings (SPEC §1.2): exact on one-hot logits, linear in the probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.models import lfq
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.models.soft_embed import (
    SoftEmbedder, expected_bits, expected_embedding, hard_bits, mask_bits, soft_probs)

BITS, SPLITS = 6, 2
V = 2 ** (BITS // SPLITS)


def _onehot_logits(tokens, v, scale=1e4):
    return scale * (jax.nn.one_hot(tokens, v) - 1.0)


def test_one_hot_logits_give_hard_bits():
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 5, SPLITS), 0, V)
    soft = SoftEmbedder("soft", tau=1.0).bits(_onehot_logits(tokens, V))
    np.testing.assert_array_equal(np.asarray(soft), np.asarray(hard_bits(tokens, BITS, SPLITS)))
    # Split-major with split 0 = low bits: identical to the full token's LFQ bits.
    full = lfq.merge_splits(tokens, BITS, SPLITS)
    np.testing.assert_array_equal(np.asarray(soft), np.asarray(lfq.indices_to_bits(full, BITS)))


def test_expected_bits_interpolate_linearly():
    a, b = jnp.array([[3, 5]]), jnp.array([[6, 0]])
    for alpha in (0.0, 0.25, 0.7, 1.0):
        p = alpha * jax.nn.one_hot(a, V) + (1 - alpha) * jax.nn.one_hot(b, V)
        got = expected_bits(p)
        want = alpha * hard_bits(a, BITS, SPLITS) + (1 - alpha) * hard_bits(b, BITS, SPLITS)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
        # The same through logits = log p and softmax (tau = 1).
        logits = jnp.log(jnp.clip(p, 1e-30))
        np.testing.assert_allclose(np.asarray(SoftEmbedder().bits(logits)), np.asarray(want), atol=1e-6)
    # Uniform probabilities: every expected bit is 0 (the MASK vector).
    np.testing.assert_allclose(np.asarray(expected_bits(jnp.full((1, SPLITS, V), 1.0 / V))), 0.0, atol=1e-7)


def test_expected_embedding_table():
    table = jax.random.normal(jax.random.PRNGKey(1), (V + 1, 4))  # last row = MASK, dropped
    idx = jnp.array([[1, 4, 7]])
    np.testing.assert_allclose(np.asarray(expected_embedding(jax.nn.one_hot(idx, V), table)),
                               np.asarray(table[idx]), atol=1e-6)
    p = 0.3 * jax.nn.one_hot(idx, V) + 0.7 * jax.nn.one_hot(idx[:, ::-1], V)
    np.testing.assert_allclose(np.asarray(expected_embedding(p, table)),
                               np.asarray(0.3 * table[idx] + 0.7 * table[idx[:, ::-1]]), atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        expected_embedding(jax.nn.one_hot(idx, V), table[:3])


def test_teacher_embeddings_linear_through_input_proj():
    model = LFQBert(num_tokens=4, num_bits=BITS, splits=SPLITS, hidden_dim=16, depth=1, heads=2,
                    mlp_dim=16, num_classes=3)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, SPLITS), jnp.int32),
                        jnp.zeros((1,), jnp.int32))["params"]
    a = jax.random.randint(jax.random.PRNGKey(2), (1, 4, SPLITS), 0, V)
    b = jax.random.randint(jax.random.PRNGKey(3), (1, 4, SPLITS), 0, V)
    emb = SoftEmbedder()
    hard = lambda t: model.apply({"params": params}, hard_bits(t, BITS, SPLITS), method=LFQBert.embed_bits)
    np.testing.assert_allclose(np.asarray(emb.teacher_embeddings(model, params, _onehot_logits(a, V))),
                               np.asarray(hard(a)), atol=1e-5)
    p = 0.4 * jax.nn.one_hot(a, V) + 0.6 * jax.nn.one_hot(b, V)
    got = emb.teacher_embeddings(model, params, jnp.log(jnp.clip(p, 1e-30)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(0.4 * hard(a) + 0.6 * hard(b)), atol=1e-5)
    # And the soft bits drive the full teacher exactly like hard tokens when one-hot.
    y = jnp.array([1])
    z_soft = model.apply({"params": params}, labels=y, input_bits=emb.bits(_onehot_logits(a, V)))
    z_hard = model.apply({"params": params}, a, y)
    np.testing.assert_allclose(np.asarray(z_soft), np.asarray(z_hard), atol=1e-5)


def test_mask_is_zero_bits():
    bits = hard_bits(jnp.array([[[1, 2], [V, V]]]), BITS, SPLITS)
    np.testing.assert_array_equal(np.asarray(bits[0, 1]), 0.0)
    masked = mask_bits(jnp.ones((1, 3, BITS)), jnp.array([[False, True, False]]))
    np.testing.assert_array_equal(np.asarray(masked[0, :, 0]), [1.0, 0.0, 1.0])


def test_straight_through_variants():
    logits = jax.random.normal(jax.random.PRNGKey(4), (3, SPLITS, V))
    w = jax.random.normal(jax.random.PRNGKey(5), (3, SPLITS, V))
    for mode in ("st", "gumbel_st"):
        p = soft_probs(logits, 0.5, mode, jax.random.PRNGKey(6))
        # Forward: exactly one-hot.
        np.testing.assert_array_equal(np.asarray(p.max(-1)), 1.0)
        np.testing.assert_array_equal(np.asarray(p.sum(-1)), 1.0)
        # Backward: the softmax's gradient, not zero.
        g = jax.grad(lambda z: jnp.sum(soft_probs(z, 0.5, mode, jax.random.PRNGKey(6)) * w))(logits)
        assert float(jnp.abs(g).max()) > 1e-3
    st = soft_probs(logits, 0.5, "st")
    np.testing.assert_array_equal(np.asarray(st.argmax(-1)), np.asarray(logits.argmax(-1)))
    g1 = soft_probs(logits, 1.0, "gumbel", jax.random.PRNGKey(7))
    np.testing.assert_allclose(np.asarray(g1.sum(-1)), 1.0, atol=1e-6)
    assert not np.allclose(np.asarray(g1), np.asarray(soft_probs(logits, 1.0)))
    with pytest.raises(ValueError, match="rng"):
        soft_probs(logits, 1.0, "gumbel")
    with pytest.raises(ValueError, match="mode"):
        SoftEmbedder(mode="nope")


def test_decoder_bits_grid():
    tokens = jax.random.randint(jax.random.PRNGKey(8), (2, 6, SPLITS), 0, V)
    bits = SoftEmbedder().decoder_bits(_onehot_logits(tokens, V), (2, 3))
    assert bits.shape == (2, 2, 3, BITS)
    np.testing.assert_array_equal(np.asarray(bits.reshape(2, 6, BITS)), np.asarray(hard_bits(tokens, BITS, SPLITS)))
    with pytest.raises(ValueError, match="grid"):
        SoftEmbedder().decoder_bits(_onehot_logits(tokens, V), (4, 4))
