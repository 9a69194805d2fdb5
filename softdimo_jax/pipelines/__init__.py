"""Pipelines: the only code that knows stage order and workdir layout (registry.py maps
`config.pipeline` to the pipeline `python -m softdimo_jax.main` runs)."""
