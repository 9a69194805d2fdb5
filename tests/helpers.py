"""Shared test helpers (importable: pytest puts tests/ on sys.path)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.pipelines import phases

FAST = {"xla_backend_optimization_level": 0}  # compile time dominates the tiny test steps


@contextlib.contextmanager
def fast_compiles():
    """Inside: every `jax.jit(...)` call compiles with FAST unless it names its own options.
    A plain `functools.partial(jax.jit, compiler_options=FAST)` patch misses the jits that
    pass `compiler_options=None` explicitly, the Trainer's step among them (the largest
    compile of a pipeline run)."""
    jit = jax.jit

    def fast_jit(fun, *args, compiler_options=None, **kwargs):
        return jit(fun, *args, compiler_options=FAST if compiler_options is None else compiler_options, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "jit", fast_jit)
        yield


def distill_stepper(distiller, teacher_params, compiler_options=FAST):
    """The distillation step exactly as a training run compiles it (the Trainer's
    `jit_train_step`): fn(state, step, conditions=None) -> (state, metrics), with the rng
    folded from the config's seed and `step`; the state is donated."""
    trainer = phases.distill_trainer(distiller, teacher_params, None, compiler_options=compiler_options)
    step_fn = trainer.compiled_step()

    def step(state, step_number, conditions=None):
        return step_fn(state, conditions, jnp.asarray(step_number, jnp.int32), trainer.frozen)

    return step


class HashTokenizer:
    """Stand-in for the CLIP BPE tokenizer of tiny text towers (vocabulary 48): deterministic
    ids per word, SOT 1 / EOT 45 framing, zero padding to `context_length`."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def tokenize(self, texts):
        n = self.context_length
        out = np.zeros((len(texts), n), np.int32)
        for i, t in enumerate(texts):
            ids = [1] + [2 + (sum(map(ord, w)) % 40) for w in t.split()][: n - 2] + [45]
            out[i, : len(ids)] = ids
        return out
