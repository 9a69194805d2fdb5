"""MaskGen family: MaskGen-VQ (MM-DiT), TA-TiTok, OpenCLIP text tower, BPE tokenizer,
converters and MaskGen's sampler."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax import parity
from softdimo_jax.conversion.state_dict import ConversionError


def _run(path):
    checks = parity.run_fixture(str(path))
    bad = [c.line() for c in checks if not c.passed]
    assert checks and not bad, "\n".join(bad)
    return {c.name for c in checks}


# ---------------------------------------------------------------------------- MaskGen-VQ
def test_maskgen_vq_fixture_parity(fixtures_dir):
    names = _run(fixtures_dir / "maskgen_vq_a.npz")
    assert {"logits", "cfg_logits", "gen_ids", "gen_step_logits"} <= names
