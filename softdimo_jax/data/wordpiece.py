"""BERT's WordPiece tokenizer (as `transformers.BertTokenizer`, uncased), pure Python, with
ImageReward's conventions.

The vocabulary is the user's `vocab.txt` (bert-base-uncased's, 30,522 lines; one token per
line, id = line number). Nothing is downloaded. Lookup order for the file: the `vocab_path`
argument, then the SOFTDIMO_BERT_VOCAB environment variable.

Pipeline, as the original:
1. special tokens written literally in the text ([CLS], [SEP], [PAD], [MASK], [UNK] and
   BLIP's added [DEC] / [ENC]) are split out first and kept whole (case-sensitive);
2. basic tokenization of the rest: drop NUL, U+FFFD and control characters, map whitespace
   to spaces, surround CJK ideographs with spaces, NFC-normalise, split on whitespace; per
   word lower-case, strip accents (NFD, drop combining marks), split off every punctuation
   character (ASCII symbols count as punctuation, as in BERT);
3. WordPiece: greedy longest-match-first from the left, continuation pieces prefixed
   `##`; a word with an unmatched remainder, or longer than 100 characters, becomes [UNK].

`encode` gives [CLS] + pieces + [SEP], truncated to `max_length` (the pieces are cut,
[SEP] stays last) and right-padded with [PAD], plus the attention mask — ImageReward's
`tokenizer(prompt, padding='max_length', truncation=True, max_length=35)`. The ids are the
vocab's: with bert-base-uncased [CLS] = 101, [SEP] = 102, [PAD] = 0. BLIP's `init_tokenizer`
adds [DEC] and [ENC] after the vocabulary (30522, 30523); ImageReward keeps [CLS] at
position 0 (it does not swap in [ENC]).
"""

from __future__ import annotations

import os
import unicodedata
from typing import Sequence

import numpy as np

from softdimo_jax.runtime.errors import BadInput

VOCAB_ENV = "SOFTDIMO_BERT_VOCAB"
IMAGEREWARD_MAX_LENGTH = 35
_REQUIRED = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# BLIP's init_tokenizer: bos_token '[DEC]', then additional special token '[ENC]'.
_BLIP_ADDED = ("[DEC]", "[ENC]")
_MAX_WORD_CHARS = 100
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_whitespace(c: str) -> bool:
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_control(c: str) -> bool:
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    # BERT treats every non-alphanumeric ASCII character as punctuation ($, ^, `, ...).
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def basic_tokenize(text: str) -> list[str]:
    """BERT's BasicTokenizer (do_lower_case=True, tokenize_chinese_chars=True)."""
    out = []
    for c in text:
        cp = ord(c)
        if cp == 0 or cp == 0xFFFD or _is_control(c):
            continue
        if _is_whitespace(c):
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {c} ")
        else:
            out.append(c)
    words = []
    for word in unicodedata.normalize("NFC", "".join(out)).split():
        word = unicodedata.normalize("NFD", word.lower())
        word = "".join(c for c in word if unicodedata.category(c) != "Mn")
        piece = []
        for c in word:
            if _is_punctuation(c):
                if piece:
                    words.append("".join(piece))
                    piece = []
                words.append(c)
            else:
                piece.append(c)
        if piece:
            words.append("".join(piece))
    return words


def read_vocab(path: str) -> dict[str, int]:
    """vocab.txt -> {token: line number} (a repeated token keeps its last line, as BERT's loader)."""
    try:
        with open(path, encoding="utf-8") as f:
            return {line.rstrip("\n"): i for i, line in enumerate(f)}
    except FileNotFoundError:
        raise BadInput(f"BERT vocab file not found: {path!r} — pass the vocab.txt of bert-base-uncased "
                       f"(ImageReward's tokenizer, from the Hugging Face repo google-bert/bert-base-uncased) "
                       f"as vocab_path or in {VOCAB_ENV}") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise BadInput(f"{path!r} is not a BERT vocab.txt ({type(e).__name__}) — pass bert-base-uncased's "
                       "vocab.txt, one token per line") from None


class WordPieceTokenizer:
    """Uncased BERT WordPiece tokenizer reading a `vocab.txt` (see module docstring)."""

    def __init__(self, vocab_path: str | None = None, max_length: int = IMAGEREWARD_MAX_LENGTH,
                 add_blip_tokens: bool = True):
        path = vocab_path or os.environ.get(VOCAB_ENV)
        if not path:
            raise BadInput("no BERT vocab file given — pass the vocab.txt of bert-base-uncased (ImageReward's "
                           f"tokenizer) as vocab_path or set {VOCAB_ENV} to its path")
        if max_length < 2:
            raise BadInput(f"max_length {max_length} leaves no room for [CLS] and [SEP] — use at least 2")
        self.vocab = read_vocab(path)
        missing = [t for t in _REQUIRED if t not in self.vocab]
        if missing:
            raise BadInput(f"{path!r} lacks the BERT special tokens {missing} — pass bert-base-uncased's vocab.txt")
        if add_blip_tokens:
            for tok in _BLIP_ADDED:
                self.vocab.setdefault(tok, len(self.vocab))
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        self.max_length = int(max_length)
        self.specials = tuple(t for t in _SPECIALS + (_BLIP_ADDED if add_blip_tokens else ()) if t in self.vocab)
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def wordpiece(self, word: str) -> list[str]:
        if len(word) > _MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(sub)
            start = end
        return pieces

    def _split_specials(self, text: str) -> list[tuple[str, bool]]:
        parts = [(text, False)]
        for tok in self.specials:
            nxt = []
            for chunk, special in parts:
                if special or tok not in chunk:
                    nxt.append((chunk, special))
                    continue
                pieces = chunk.split(tok)
                for j, piece in enumerate(pieces):
                    if j:
                        nxt.append((tok, True))
                    nxt.append((piece, False))
            parts = nxt
        return parts

    def tokenize(self, text: str) -> list[str]:
        out = []
        for chunk, special in self._split_specials(text):
            if special:
                out.append(chunk)
            else:
                for word in basic_tokenize(chunk):
                    out += self.wordpiece(word)
        return out

    def encode(self, text: str, *, truncation: bool = True) -> tuple[list[int], list[int]]:
        """-> (ids, attention_mask), each of length max_length (see module docstring).

        truncation=True cuts the pieces as ImageReward does (truncation=True, max_length=35);
        False refuses a prompt that does not fit."""
        ids = [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)]
        room = self.max_length - 2
        if len(ids) > room:
            if not truncation:
                raise BadInput(f"prompt {text[:40]!r}... has {len(ids)} tokens, more than the {room} that fit in "
                               f"max_length {self.max_length} with [CLS] and [SEP] — shorten it or allow truncation")
            ids = ids[:room]
        ids = [self.cls_id] + ids + [self.sep_id]
        mask = [1] * len(ids) + [0] * (self.max_length - len(ids))
        return ids + [self.pad_id] * (self.max_length - len(ids)), mask

    def __call__(self, texts: str | Sequence[str], *, truncation: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One prompt or a list -> (input_ids (B, max_length) int32, attention_mask (B, max_length) int32)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self.encode(t, truncation=truncation) for t in texts]
        ids = np.asarray([r[0] for r in rows], np.int32).reshape(len(rows), self.max_length)
        mask = np.asarray([r[1] for r in rows], np.int32).reshape(len(rows), self.max_length)
        return ids, mask

    def decode(self, ids) -> str:
        """Pieces joined back (specials and padding dropped, `##` continuations glued)."""
        toks = [self.inv_vocab.get(int(i), "[UNK]") for i in ids]
        toks = [t for t in toks if t not in ("[PAD]", "[CLS]", "[SEP]")]
        return " ".join(toks).replace(" ##", "")
