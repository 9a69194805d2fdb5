"""softdimo_jax: Soft-Di[M]O in JAX/Flax.

Layout (ARCHITECTURE.md at the repository root has the import rules):
  models/       Flax linen modules (teachers, tokenizers, evaluation networks)
  core/         the method, pure JAX: masking, adapters, Di[M]O, optimisers, GAN, rewards
  runtime/      trainer (the one jitted step), checkpoints, mesh, artifacts, converted checkpoints
  pipelines/    stage order and workdir layout: the digits and at-scale pipelines
  sampling/     multi-step teacher samplers, one-step student, TTEO
  data/         digits (embedded default) and tfds pipelines
  evaluation/   metrics (FD-digits, FID/IS/PR)
  conversion/   PyTorch / safetensors / npz state dicts -> Flax params (strict)
  parity_checks/ per-family runners for the parity fixtures (see parity.py)
"""

__version__ = "0.1.0"
