"""softdimo_jax: Soft-Di[M]O in JAX/Flax.

Layout:
  models/       Flax linen modules (teachers, tokenizers, evaluation networks)
  conversion/   PyTorch / safetensors / npz state dicts -> Flax params (strict)
  parity_checks/ per-family runners for the parity fixtures (see parity.py)
  sampling/     multi-step teacher samplers and one-step student samplers
  data/         digits (embedded default) and tfds pipelines
  training/     shared training-loop machinery and the training phases
  evaluation/   metrics (FD-digits, FID/IS/PR)
"""

__version__ = "0.1.0"
