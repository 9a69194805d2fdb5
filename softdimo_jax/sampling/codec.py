"""Tokenizer encode / decode of whole datasets, in jitted fixed-size batches (one compiled
shape serves every call)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from softdimo_jax.models.maskbit_tokenizer import ConvVQModel


@functools.lru_cache(maxsize=16)
def _encode_fn(model: ConvVQModel):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode)["indices"])


@functools.lru_cache(maxsize=16)
def _decode_fn(model: ConvVQModel):
    return jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.decode_tokens))


def in_fixed_batches(fn, x, batch_size: int):
    """fn over x in batches of exactly `batch_size` rows (the tail is padded, then cut), so
    one compiled shape serves every call."""
    x = np.asarray(x)
    n = len(x)
    out = []
    for i in range(0, n, batch_size):
        chunk = x[i : i + batch_size]
        keep = len(chunk)
        if keep < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - keep, 0)])
        out.append(np.asarray(fn(chunk))[:keep])
    return np.concatenate(out)


def encode_dataset(model: ConvVQModel, params, images, batch_size: int = 256) -> np.ndarray:
    """(N, H, W, C) images -> (N, h·w) int32 token ids (row-major), in jitted batches."""
    fn = _encode_fn(model)
    ids = in_fixed_batches(lambda x: fn(params, x.astype(np.float32)), images, batch_size)
    return ids.reshape(len(ids), -1).astype(np.int32)


def decode_tokens(model: ConvVQModel, params, tokens, grid: int, batch_size: int = 500) -> np.ndarray:
    """(N, L) token ids -> (N, H, W, C) images clipped to [0, 1]."""
    fn = _decode_fn(model)
    tokens = np.asarray(tokens, np.int32).reshape(-1, grid, grid)
    return np.clip(in_fixed_batches(lambda t: fn(params, t), tokens, batch_size), 0.0, 1.0)
