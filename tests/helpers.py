"""Shared test helpers (importable: pytest puts tests/ on sys.path)."""

import jax.numpy as jnp

from softdimo_jax.pipelines import phases

FAST = {"xla_backend_optimization_level": 0}  # compile time dominates the tiny test steps


def distill_stepper(distiller, teacher_params, compiler_options=FAST):
    """The distillation step exactly as a training run compiles it (the Trainer's
    `jit_train_step`): fn(state, step, conditions=None) -> (state, metrics), with the rng
    folded from the config's seed and `step`; the state is donated."""
    trainer = phases.distill_trainer(distiller, teacher_params, None, compiler_options=compiler_options)
    step_fn = trainer.compiled_step()

    def step(state, step_number, conditions=None):
        return step_fn(state, conditions, jnp.asarray(step_number, jnp.int32), trainer.frozen)

    return step
