"""Conversion refuses hostile or ambiguous checkpoints: duplicate names, hostile pickles
and zips (bounded in time and memory), truncated files; `convert` prints one line."""

import pathlib

import numpy as np
import pytest

from softdimo_jax import parity
from softdimo_jax.conversion.maskbit import convert_maskbit_bert
from softdimo_jax.conversion.state_dict import ConversionError, StrictStateDict
from softdimo_jax.models.maskbit_bert import maskbit_bert_from_cfg
from softdimo_jax.runtime.errors import BadInput


@pytest.fixture(scope="module")
def bert_fx(fixtures_dir):
    return parity.load_fixture(str(fixtures_dir / "maskbit_bert_a.npz"))


def test_key_and_legacy_alias_both_present_is_an_error(bert_fx):
    sd = dict(bert_fx.sd)
    sd["token_emb.weight"] = sd["input_proj.weight"] + 1.0
    with pytest.raises(ConversionError) as e:
        convert_maskbit_bert(sd, maskbit_bert_from_cfg(bert_fx.cfg))
    msg = str(e.value)
    assert "input_proj.weight and token_emb.weight both map to input_proj.weight" in msg
    assert isinstance(e.value, BadInput)


@pytest.mark.parametrize("wrapper", ["module.", "_orig_mod."])
def test_wrapped_and_plain_copy_is_an_error(bert_fx, wrapper):
    sd = dict(bert_fx.sd)
    sd[wrapper + "last_layer.0.weight"] = sd["last_layer.0.weight"] * 0
    with pytest.raises(ConversionError, match=rf"last_layer\.0\.weight and {wrapper}last_layer\.0\.weight both map"):
        convert_maskbit_bert(sd, maskbit_bert_from_cfg(bert_fx.cfg))


def test_duplicates_do_not_depend_on_key_order():
    a = {"module.w": np.ones(2), "w": np.zeros(2)}
    for sd in (a, dict(reversed(list(a.items())))):
        s = StrictStateDict(sd, strip_prefixes=("module.",))
        s.take("w", (2,))
        with pytest.raises(ConversionError, match="both map to w"):
            s.finish()
