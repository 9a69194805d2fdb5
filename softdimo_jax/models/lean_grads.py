"""Transformer pieces with hand-written backward passes that keep fewer activations.

In the Di[M]O step the generator's residuals stay alive across the teacher and auxiliary
forwards, so what autodiff keeps per layer sets the step's peak memory. On the S
benchmark config (bench/distill_step.py) these pieces cut XLA's temporaries from 310 to
176 MB, and the step got faster, not slower (fewer bytes written and read back):

- `gelu_dense(h, w, b)` = gelu(h) @ w + b keeps only h and w. Autodiff also kept gelu(h)
  for the weight gradient and two erf/exp intermediates for gelu'(h), three more tensors
  of h's size; the backward recomputes gelu(h) and gelu'(h) elementwise.
- `dense(x, w, b)` = x @ w + b, and `gelu_dense`, compute the weight and bias gradients
  in one product and make dx wait for it. XLA:CPU's schedulers otherwise defer every
  weight and bias gradient to the end of the backward pass, keeping each layer's
  activation-sized operands alive until then.
- `attention_mix(logits, v, keep_mask, keep_prob)` = dropout(softmax(logits)) @ v keeps
  the probabilities, v and the boolean keep mask. Autodiff also kept the dropped,
  rescaled probabilities: one more (B, h, L, L) float tensor per layer.

Forward values are the plain formulas' op for op (bit-identical); gradients agree with
autodiff to float round-off (tests/test_lean_grads.py).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp


def exact_gelu(x):
    """torch.nn.GELU()'s default: the exact erf GELU."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_grad(x):
    """d/dx of x·Φ(x) = Φ(x) + x·φ(x), computed in float32."""
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * x32 * x32) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x32 * pdf


def _contract_last(a, b):
    """a (..., m) @ b (m, n) -> (..., n), as flax's Dense contracts."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))


def _identity(x):
    return x


def _make_dense(activation, activation_grad):
    """activation(x) @ w + b whose backward keeps only x and w, recomputes the activation
    and gets the bias gradient from the weight gradient's product."""

    @jax.custom_vjp
    def dense(x, w, b):
        y = _contract_last(activation(x), w)
        return y + b.reshape((1,) * (y.ndim - 1) + (-1,))

    def fwd(x, w, b):
        return dense(x, w, b), (x, w)

    def bwd(res, dy):
        # The barrier keeps XLA from merging activation(x) with the forward's copy (CSE),
        # which would keep that copy alive instead (S: 253 vs 156 MB of temporaries).
        (x, w), dy = jax.lax.optimization_barrier((res, dy))
        a = activation(x)
        # [a, 1]^T dy gives the weight and the bias gradient in one product. A separate
        # sum of dy over the batch is a small reduction that XLA:CPU's schedulers defer
        # to the end of the backward pass, keeping every layer's dy alive until then.
        a1 = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
        batch_axes = tuple(range(x.ndim - 1))
        dwb = jax.lax.dot_general(a1, dy, ((batch_axes, batch_axes), ((), ())))
        da = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
        dx = da if activation_grad is None else (
            da.astype(jnp.float32) * activation_grad(x)).astype(x.dtype)
        # dx waits for the weight gradient through a zero-valued scalar (XLA keeps x*0 for
        # floats: NaN semantics). XLA:CPU's schedulers otherwise defer every weight
        # gradient to the end of the backward pass (S step: 223 vs 176 MB of
        # temporaries); an optimization barrier on (dx, dw) did not survive to the
        # scheduler. A non-finite weight gradient now also makes dx non-finite, which the
        # step's finiteness check reports as it would have anyway.
        dx = dx + (dwb[0, 0] * 0).astype(dx.dtype)
        return dx, dwb[:-1].astype(w.dtype), dwb[-1].astype(w.dtype)

    dense.defvjp(fwd, bwd)
    return dense


dense = _make_dense(_identity, None)
dense.__doc__ = "x @ w + b over x's last axis (see `_make_dense` for the backward)."
gelu_dense = _make_dense(exact_gelu, _gelu_grad)
gelu_dense.__doc__ = "gelu(x) @ w + b over x's last axis; the backward keeps only x and w."


def softmax_f32(logits, dtype):
    """Softmax over the last axis in float32 (also for bf16 compute), cast to dtype."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


def _drop(probs, keep_mask, keep_prob):
    return jax.lax.select(keep_mask, probs / keep_prob, jnp.zeros_like(probs))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention_mix(logits, v, keep_mask, keep_prob: float):
    """(B, h, Lq, Lk) logits, (B, h, Lk, d) values -> dropout(softmax(logits)) @ v.

    keep_mask (B, h, Lq, Lk) bool: where the dropout keeps a weight (kept weights are
    scaled by 1/keep_prob, as torch's dropout does). logits and v share one dtype."""
    probs = _drop(softmax_f32(logits, v.dtype), keep_mask, keep_prob)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def _attention_mix_fwd(logits, v, keep_mask, keep_prob):
    if logits.dtype != v.dtype:
        raise TypeError(f"attention_mix: logits ({logits.dtype}) and v ({v.dtype}) must share a dtype")
    probs = softmax_f32(logits, v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", _drop(probs, keep_mask, keep_prob), v)
    return out, (probs, v, keep_mask)


def _attention_mix_bwd(keep_prob, res, dout):
    (probs, v, keep_mask) = res
    # The dropped weights again, as probs * (mask / keep_prob): written with other ops
    # than the forward's select so that XLA cannot merge the two (CSE) and keep the
    # forward's copy alive after all (XLA:CPU drops optimization barriers first).
    scale = jnp.where(keep_mask, 1.0 / keep_prob, 0.0).astype(probs.dtype)
    dv = jnp.einsum("bhqk,bhqd->bhkd", probs * scale, dout)
    dprobs = jnp.einsum("bhqd,bhkd->bhqk", dout, v) * scale
    p32, dp32 = probs.astype(jnp.float32), dprobs.astype(jnp.float32)
    dlogits = p32 * (dp32 - jnp.sum(dp32 * p32, axis=-1, keepdims=True))
    return dlogits.astype(v.dtype), dv, None


attention_mix.defvjp(_attention_mix_fwd, _attention_mix_bwd)
