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


# ---------------------------------------------------------------------- OpenCLIP text + BPE
def test_clip_text_fixture_parity(fixtures_dir):
    names = _run(fixtures_dir / "maskgen_clip_text_a.npz")
    assert {"penultimate", "pooled", "text_guidance", "pre_condition", "tokenizer_ids"} <= names


def test_bpe_tokenizer_known_ids_and_truncation(fixtures_dir):
    from softdimo_jax.data.clip_bpe import ClipBPETokenizer

    tok = ClipBPETokenizer(str(fixtures_dir / "bpe_simple_vocab_16e6.txt.gz"))
    assert tok.vocab_size == 49408 and (tok.sot_id, tok.eot_id) == (49406, 49407)
    ids = tok.tokenize(["a photo of a cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert (ids[0, 7:] == 0).all() and list(ids[1, :3]) == [49406, 49407, 0]
    long = tok.tokenize("word " * 200)[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long != 0).all()
    # Cleaning: case, repeated whitespace and HTML entities do not change the ids.
    np.testing.assert_array_equal(tok.tokenize("A  Photo of&#32;a CAT"), tok.tokenize("a photo of a cat"))
    assert tok.decode(tok.encode("Hello, world")).strip() == "hello , world"


def test_bpe_tokenizer_missing_file_is_a_clear_error(tmp_path, monkeypatch):
    from softdimo_jax.data.clip_bpe import ClipBPETokenizer

    with pytest.raises(FileNotFoundError, match="merges file"):
        ClipBPETokenizer(str(tmp_path / "nope.txt.gz"))
