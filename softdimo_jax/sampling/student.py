"""One-step sampling from the distilled Di[M]O / Soft-Di[M]O generator.

The generator sees the same kind of input it was trained on (SPEC §1.1 step 1): random
tokens with round(r_init·L) MASK positions, embedded and perturbed with σ-scaled Gaussian
noise, plus the class label. One forward gives logits z (B, L, S, V); then
- 'hard': tokens ~ Cat(softmax(z / temperature)) (argmax at temperature 0), decoded through
  the tokenizer's bit codebook;
- 'soft': the expected ±1 bits under softmax(z / tau) (SPEC §1.2), decoded directly; the
  decoder reads continuous bits, so the soft sample is a smooth function of the generator.

The EMA weights are the default (`core.dimo.generator_params(state)`), as in the reference.
`one_step_logits` serves every family's adapter (class labels or text conditions); the
commands reach it through `softdimo_jax.sampling.api`, which adds each family's decode.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

import numpy as np

from softdimo_jax.core.adapters import LFQBertAdapter
from softdimo_jax.core.dimo import perturb
from softdimo_jax.core.masking import initial_tokens
from softdimo_jax.models import lfq
from softdimo_jax.models.soft_embed import SoftEmbedder
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.sampling.batching import padded_label_batches

MODES = ("hard", "soft")


def one_step_logits(adapter, params, rng, labels, *, r_init: float = 0.6, sigma_init: float = 0.1,
                    init_mask_mode: str = "position"):
    """z = G(perturbed embedding of the initial state, labels): (B, L, S, V), deterministic.
    labels: (B,) class ids, or the adapter's text conditions (a dict of (B, ...) arrays)."""
    if not isinstance(labels, dict):
        labels = jnp.asarray(labels, jnp.int32)
    e = initial_embeddings(adapter, params, rng, labels, r_init=r_init, sigma_init=sigma_init,
                           init_mask_mode=init_mask_mode)
    return adapter.student_logits(params, labels, embeddings=e)


def initial_embeddings(adapter, params, rng, labels, *, r_init: float, sigma_init: float,
                       init_mask_mode: str):
    """The generator's input: embedded initial state (exactly round(r_init·L) MASK positions),
    σ-perturbed. TTEO optimises this tensor; plain sampling uses it as drawn."""
    k_tok, k_eps = jax.random.split(rng)
    batch = jax.tree.leaves(labels)[0].shape[0]
    # Text adapters take their conditions as given (a batch of exactly `batch` rows).
    conditions = labels if isinstance(labels, dict) else None
    _, tokens = initial_tokens(k_tok, batch, adapter, r_init, init_mask_mode, conditions)
    e = adapter.embed(params, tokens)
    return perturb(e, jax.random.normal(k_eps, e.shape, jnp.float32), sigma_init)


def make_student_sampler(model, *, mesh=None, mode: str = "hard", r_init: float = 0.6,
                         sigma_init: float = 0.1, init_mask_mode: str = "position",
                         temperature: float = 1.0, soft_mode: str = "soft", tau: float = 1.0,
                         dtype=None) -> Callable:
    """fn(params, rng, labels) -> {"tokens": (B, L, S)} ('hard') or {"bits": (B, L, bits)}
    ('soft'), jitted; labels are sharded over `mesh` (default: all devices)."""
    if mode not in MODES:
        raise ValueError(f"unknown student sampling mode {mode!r}; choose one of {MODES}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = argmax), got {temperature}")
    adapter = LFQBertAdapter.from_module(model, dropout=0.0, dtype=dtype, remat=False)
    embedder = SoftEmbedder(mode=soft_mode, tau=tau)
    mesh = meshlib.as_auto_mesh(mesh if mesh is not None else meshlib.make_mesh())

    def fn(params, rng, labels):
        k_in, k_out = jax.random.split(rng)
        z = one_step_logits(adapter, params, k_in, labels, r_init=r_init, sigma_init=sigma_init,
                            init_mask_mode=init_mask_mode)
        if mode == "soft":
            return {"bits": embedder.bits(z, k_out if soft_mode.startswith("gumbel") else None)}
        if temperature == 0:
            return {"tokens": jnp.argmax(z, axis=-1).astype(jnp.int32)}
        return {"tokens": jax.random.categorical(k_out, z / temperature, axis=-1).astype(jnp.int32)}

    jitted = jax.jit(fn, in_shardings=(None, meshlib.replicated(mesh), meshlib.batch_sharding(mesh, 1)))

    def sample(params, rng, labels):
        labels = jnp.asarray(labels, jnp.int32)
        meshlib.check_batch_divisible(labels.shape[0], mesh)
        return jitted(params, rng, labels)

    return sample


def sampler_from_config(model, distill_config, mode: str = "hard", mesh=None) -> Callable:
    """The student sampler with the settings of a `default_distill_config()`."""
    c = distill_config
    return make_student_sampler(
        model, mesh=mesh, mode=mode, r_init=c.r_init, sigma_init=c.sigma_init,
        init_mask_mode=c.init_mask_mode, temperature=c.sample.temperature,
        soft_mode=c.soft.mode, tau=c.soft.tau, dtype=c.compute_dtype,
    )


def decode_images(tokenizer, tokenizer_params, out: dict, num_bits: int, splits: int):
    """{"tokens"} or {"bits"} from a student sampler -> images (B, H, W, C) in [0, 1]."""
    if "bits" in out:
        bits = out["bits"]
    else:
        bits = lfq.subtokens_to_bits(out["tokens"], num_bits, splits)
    b, n, k = bits.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    images = tokenizer.apply({"params": tokenizer_params}, bits.reshape(b, side, side, k),
                             method=type(tokenizer).decode_bits)
    return jnp.clip(images, 0.0, 1.0)


def make_student_image_sampler(model, tokenizer, distill_config, mode: str = "hard", mesh=None):
    """fn(gen_params, tokenizer_params, rng, labels) -> images in [0, 1] (one jitted decode)."""
    sample = sampler_from_config(model, distill_config, mode, mesh)
    decode = jax.jit(lambda tp, out: decode_images(tokenizer, tp, out, model.num_bits, model.splits))
    return lambda gp, tp, rng, labels: decode(tp, sample(gp, rng, labels))


def sample_student_images(model, params, tokenizer, tok_params, distill_config, labels, mode: str, mesh,
                          batch_size: int, seed: int) -> np.ndarray:
    """One-step student samples of `labels`, decoded to images (N, H, W, C) in [0, 1]; batch
    i uses rng fold_in(PRNGKey(seed), i) (the stream TTEO rows reuse)."""
    sample = make_student_image_sampler(model, tokenizer, distill_config, mode, mesh)
    out = []
    for i, padded, n in padded_label_batches(labels, batch_size, mesh.size):
        imgs = sample(params, tok_params, jax.random.fold_in(jax.random.PRNGKey(seed), i), padded)
        out.append(np.asarray(imgs)[:n])
    return np.concatenate(out)
