"""Checkpoint conversion: read PyTorch-style state dicts, map them strictly to Flax params."""

from softdimo_jax.conversion.state_dict import (  # noqa: F401
    ConversionError,
    StrictStateDict,
    check_params_match,
    load_state_dict,
)
