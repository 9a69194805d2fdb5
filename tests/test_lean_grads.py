"""The hand-written backward passes of models/lean_grads.py against plain autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.models import lean_grads, maskbit_bert
from softdimo_jax.models.maskbit_bert import Dropout, LFQBert


def _plain_dense(x, w, b):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))) + b


def _plain_gelu_dense(x, w, b):
    return _plain_dense(jax.nn.gelu(x, approximate=False), w, b)


def _plain_attention_mix(logits, v, keep_mask, keep_prob):
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    probs = jax.lax.select(keep_mask, probs / keep_prob, jnp.zeros_like(probs))
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def _grads(f, args, argnums, cot):
    return jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=argnums)(*args)


@pytest.mark.parametrize("lean,plain", [(lean_grads.dense, _plain_dense),
                                        (lean_grads.gelu_dense, _plain_gelu_dense)])
def test_dense_matches_autodiff(lean, plain):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (3, 5, 8))
    w = jax.random.normal(k[1], (8, 6)) * 0.3
    b = jax.random.normal(k[2], (6,))
    cot = jax.random.normal(k[3], (3, 5, 6))
    np.testing.assert_array_equal(jax.jit(lean)(x, w, b), jax.jit(plain)(x, w, b))
    got = jax.jit(lambda *a: _grads(lean, a, (0, 1, 2), cot))(x, w, b)
    want = jax.jit(lambda *a: _grads(plain, a, (0, 1, 2), cot))(x, w, b)
    for g, e, name in zip(got, want, ("dx", "dw", "db")):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)


def test_dense_bf16_gradient_dtypes():
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    w = jnp.ones((4, 5), jnp.bfloat16)
    b = jnp.zeros((5,), jnp.bfloat16)
    dx, dw, db = _grads(lean_grads.gelu_dense, (x, w, b), (0, 1, 2), jnp.ones((2, 3, 5), jnp.bfloat16))
    assert dx.dtype == dw.dtype == db.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(dx, np.float32)).all()


def test_attention_mix_matches_autodiff():
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    logits = jax.random.normal(k[0], (2, 3, 7, 7)) * 2.0
    v = jax.random.normal(k[1], (2, 3, 7, 4))
    mask = jax.random.bernoulli(k[2], 0.8, logits.shape)
    cot = jax.random.normal(k[3], (2, 3, 7, 4))
    lean = lambda l, vv: lean_grads.attention_mix(l, vv, mask, 0.8)
    plain = lambda l, vv: _plain_attention_mix(l, vv, mask, 0.8)
    np.testing.assert_array_equal(jax.jit(lean)(logits, v), jax.jit(plain)(logits, v))
    got = jax.jit(lambda *a: _grads(lean, a, (0, 1), cot))(logits, v)
    want = jax.jit(lambda *a: _grads(plain, a, (0, 1), cot))(logits, v)
    for g, e, name in zip(got, want, ("dlogits", "dv")):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=name)


def test_attention_mix_rejects_mixed_dtypes():
    with pytest.raises(TypeError, match="share a dtype"):
        jax.grad(lambda l: lean_grads.attention_mix(l, jnp.ones((1, 1, 2, 2), jnp.bfloat16),
                                                    jnp.ones((1, 1, 2, 2), bool), 0.9).sum().astype(
            jnp.float32))(jnp.ones((1, 1, 2, 2), jnp.float32))


def test_dropout_mask_is_flax_dropout():
    """Our fused-threefry Dropout (and its keep_mask) draws flax.linen.Dropout's masks."""
    x = jnp.ones((4, 9, 16))
    rngs = {"dropout": jax.random.PRNGKey(7)}
    ours = Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs)
    theirs = nn.Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(ours, theirs)
    mask = Dropout(0.3).apply({}, x.shape, rngs=rngs, method=Dropout.keep_mask)
    np.testing.assert_array_equal(mask, theirs != 0)


def _tiny_bert(num_tokens=16, hidden_dim=32, mlp_dim=64):
    model = LFQBert(num_tokens=num_tokens, num_bits=6, splits=2, hidden_dim=hidden_dim, depth=2,
                    heads=4, mlp_dim=mlp_dim, num_classes=10, dropout=0.1)
    toks = jax.random.randint(jax.random.PRNGKey(2), (3, num_tokens, 2), 0, 9)
    labels = jnp.array([1, 2, 10])
    params = model.init(jax.random.PRNGKey(0), toks, labels)["params"]
    return model, params, toks, labels


def _param_grads(model, params, toks, labels):
    def loss(p):
        logits = model.apply({"params": p}, toks, labels, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(3)})
        return jnp.sum(jnp.sin(logits))
    return jax.jit(jax.value_and_grad(loss))(params)


def test_lfqbert_gradients_match_plain_autodiff(monkeypatch):
    """Whole-model check: LFQBert with the lean pieces swapped for the plain formulas (plain
    autodiff) gives the same loss (same dropout masks) and the same parameter gradients."""
    model, params, toks, labels = _tiny_bert()
    loss, grads = _param_grads(model, params, toks, labels)
    monkeypatch.setattr(maskbit_bert, "dense", _plain_dense)
    monkeypatch.setattr(maskbit_bert, "gelu_dense", _plain_gelu_dense)
    monkeypatch.setattr(maskbit_bert, "attention_mix", _plain_attention_mix)
    plain_loss, plain_grads = _param_grads(model, params, toks, labels)
    assert float(loss) == float(plain_loss)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    plain_flat = dict(jax.tree_util.tree_flatten_with_path(plain_grads)[0])
    for path, g in flat:
        np.testing.assert_allclose(g, plain_flat[path], rtol=2e-4, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_lfqbert_gradient_needs_fewer_temporaries(monkeypatch):
    """What the pieces are for: XLA's temporary memory for the parameter gradient is lower
    than with plain autodiff under XLA:CPU's memory-optimised scheduler (the benchmark's
    --lean; 176 vs 310 MB on the S step; ~0.6x here). The default CPU scheduler gains
    little from them."""
    model, params, toks, labels = _tiny_bert(num_tokens=64, hidden_dim=64, mlp_dim=256)

    def temps():
        def loss(p):
            logits = model.apply({"params": p}, toks, labels, deterministic=False,
                                 rngs={"dropout": jax.random.PRNGKey(3)})
            return jnp.sum(logits)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile(
            {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"})
        return compiled.memory_analysis().temp_size_in_bytes

    lean = temps()
    monkeypatch.setattr(maskbit_bert, "dense", _plain_dense)
    monkeypatch.setattr(maskbit_bert, "gelu_dense", _plain_gelu_dense)
    monkeypatch.setattr(maskbit_bert, "attention_mix", _plain_attention_mix)
    plain = temps()
    assert lean < 0.75 * plain, (lean, plain)
