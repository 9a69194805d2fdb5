"""BERT WordPiece tokenizer with ImageReward's conventions, on a tiny vocab.txt written here."""

import numpy as np
import pytest

from softdimo_jax.data.wordpiece import VOCAB_ENV, WordPieceTokenizer, basic_tokenize
from softdimo_jax.runtime.errors import BadInput

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "##s", "on", "the", "mat", "un",
         "##aff", "##able", "!", ",", "$", "cafe", "东", "京", "play", "##ing", "##ed", "'", "t", "don"]


@pytest.fixture()
def vocab_file(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return str(p)


def _ids(*toks):
    return [VOCAB.index(t) for t in toks]


def test_basic_tokenization_rules():
    assert basic_tokenize("  Héllo,\tWORLD!! ") == ["hello", ",", "world", "!", "!"]
    # accents stripped after lower-casing; CJK ideographs split one by one; ASCII symbols are punctuation
    assert basic_tokenize("Café 东京$5^x") == ["cafe", "东", "京", "$", "5", "^", "x"]
    # control characters dropped, NUL / U+FFFD dropped, odd whitespace becomes a separator
    assert basic_tokenize("a\x00b\ufffd\x07c\u3000d\u00a0e") == ["abc", "d", "e"]
    assert basic_tokenize("don't") == ["don", "'", "t"]


def test_wordpiece_greedy_longest_match(vocab_file):
    tok = WordPieceTokenizer(vocab_file)
    assert tok.tokenize("unaffable cats") == ["un", "##aff", "##able", "cat", "##s"]
    assert tok.tokenize("Playing played") == ["play", "##ing", "play", "##ed"]
    # an unmatched remainder makes the whole word [UNK]; so does a word over 100 characters
    assert tok.tokenize("catx dog") == ["[UNK]", "[UNK]"]
    assert tok.tokenize("a" * 101) == ["[UNK]"]
    # literal special tokens are kept whole (case-sensitive), BLIP's added ones too
    assert tok.tokenize("a [MASK] cat[SEP]") == ["a", "[MASK]", "cat", "[SEP]"]
    assert tok.vocab["[DEC]"] == len(VOCAB) and tok.vocab["[ENC]"] == len(VOCAB) + 1
    assert tok.tokenize("[ENC] a") == ["[ENC]", "a"]


def test_imagereward_padding_and_truncation(vocab_file):
    tok = WordPieceTokenizer(vocab_file)
    ids, mask = tok(["A cat on the mat!", ""])
    assert ids.shape == mask.shape == (2, 35) and ids.dtype == np.int32
    want = _ids("[CLS]", "a", "cat", "on", "the", "mat", "!", "[SEP]")
    assert ids[0, :8].tolist() == want and (ids[0, 8:] == 0).all()
    assert mask[0].tolist() == [1] * 8 + [0] * 27
    assert ids[1, :3].tolist() == _ids("[CLS]", "[SEP]", "[PAD]") and mask[1].sum() == 2
    # too long: cut to 33 pieces + [CLS]/[SEP], as tokenizer(..., truncation=True, max_length=35)
    long = " ".join(["cat"] * 50)
    ids, mask = tok(long)
    assert ids[0].tolist() == _ids("[CLS]") + _ids("cat") * 33 + _ids("[SEP]") and mask.all()
    with pytest.raises(BadInput, match="50 tokens, more than the 33 .* shorten it or allow truncation"):
        tok(long, truncation=False)
    assert tok.decode(tok("unaffable cats")[0][0]) == "unaffable cats"


def test_missing_or_bad_vocab_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv(VOCAB_ENV, raising=False)
    with pytest.raises(BadInput, match=f"no BERT vocab file given — .*{VOCAB_ENV}"):
        WordPieceTokenizer()
    with pytest.raises(BadInput, match="BERT vocab file not found: .*nope.txt.* — pass the vocab.txt of bert-base-uncased"):
        WordPieceTokenizer(str(tmp_path / "nope.txt"))
    bad = tmp_path / "vocab.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(BadInput, match=r"lacks the BERT special tokens \['\[CLS\]'"):
        WordPieceTokenizer(str(bad))
    monkeypatch.setenv(VOCAB_ENV, str(tmp_path / "env_missing.txt"))
    with pytest.raises(BadInput) as e:
        WordPieceTokenizer()
    assert "\n" not in str(e.value) and "env_missing.txt" in str(e.value)


def test_cases_of_berts_own_tokenizer_tests(tmp_path):
    """Expected outputs of transformers' BERT tokenizer tests, re-checked here."""
    assert basic_tokenize("  \tHäLLo!how  \n Are yoU?  ") == ["hallo", "!", "how", "are", "you", "?"]
    assert basic_tokenize("ah\u535a\u63a8zz") == ["ah", "\u535a", "\u63a8", "zz"]
    assert basic_tokenize("a-b`c.d") == ["a", "-", "b", "`", "c", ".", "d"]
    assert basic_tokenize("\xad") == []  # soft hyphen (Cf) is a control character: dropped
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "want", "##want", "##ed", "wa", "un", "runn",
                            "##ing"]) + "\n")
    tok = WordPieceTokenizer(str(p))
    assert tok.tokenize("") == []
    assert tok.tokenize("unwanted running") == ["un", "##want", "##ed", "runn", "##ing"]
    assert tok.tokenize("unwantedX running") == ["[UNK]", "runn", "##ing"]
    assert tok.tokenize("Test \xad test") == ["[UNK]", "[UNK]"]
