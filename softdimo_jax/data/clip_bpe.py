"""The CLIP byte-pair-encoding tokenizer (as open_clip's `SimpleTokenizer`), pure Python.

The merges (`bpe_simple_vocab_16e6.txt.gz`, MIT licence, as shipped inside the open_clip
wheel) are package data of softdimo_jax, so tokenizing never needs a path. Nothing is
downloaded. Lookup order for the file: the `merges_path` argument, the SOFTDIMO_CLIP_BPE
environment variable, then our packaged copy.

Pipeline (as the original): clean text (ftfy-style fixes, HTML unescape twice, collapse
whitespace, strip, lowercase) -> split into pre-tokens with CLIP's pattern (special tokens,
the contractions 's 't 're 've 'm 'll 'd, runs of letters, single numeric characters, runs of
other non-space characters) -> UTF-8 bytes mapped to printable characters -> BPE merges by
rank -> ids. `tokenize` wraps each caption as [start] + ids + [end], truncates to the
context length keeping [end] last, and pads with 0 (or, `pad='eot'`, with [end]).

Differences from the original: the pre-tokenizer classifies characters with `unicodedata`
(letters = categories L*, numbers = N*, whitespace = str.isspace) instead of the `regex`
package's \\p{L} / \\p{N} / \\s; and without the `ftfy` package (not a dependency) the
cleaning applies only ftfy's simple character fixes (curly quotes, Latin ligatures,
full-width ASCII, control characters, NFC), not its mojibake repair. When `ftfy` is
importable it is used. Both only matter for unusual Unicode input.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import unicodedata
from typing import Iterable, Sequence

import numpy as np

SOT = "<start_of_text>"
EOT = "<end_of_text>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# The 16e6 vocabulary: 256 byte symbols, their word-final forms, 48894 merges, 2 specials.
_NUM_MERGES = 49152 - 256 - 2


PACKAGED_MERGES = "bpe_simple_vocab_16e6.txt.gz"  # package data next to this module


def default_merges_path() -> str | None:
    env = os.environ.get("SOFTDIMO_CLIP_BPE")
    if env:
        return env
    packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), PACKAGED_MERGES)
    return packaged if os.path.isfile(packaged) else None


def byte_symbols() -> dict[int, str]:
    """Byte -> printable unicode character: printable Latin-1 bytes map to themselves, the
    others (controls, space, soft hyphen, ...) to 256, 257, ... in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # Vocabulary order is the printable bytes first, then the remapped ones.
    return {b: table[b] for b in keep + [b for b in range(256) if b not in keep]}


_SIMPLE_FIXES = {
    # curly single quotes / modifier apostrophe, curly double quotes
    **{c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)},
    **{c: '"' for c in (0x201C, 0x201D, 0x201E, 0x201F)},
    # Latin ligatures
    0x0132: "IJ", 0x0133: "ij", 0x01C4: "DŽ", 0x01C5: "Dž", 0x01C6: "dž", 0x01C7: "LJ",
    0x01C8: "Lj", 0x01C9: "lj", 0x01CA: "NJ", 0x01CB: "Nj", 0x01CC: "nj", 0xFB00: "ff",
    0xFB01: "fi", 0xFB02: "fl", 0xFB03: "ffi", 0xFB04: "ffl", 0xFB05: "ſt", 0xFB06: "st",
    # ideographic space
    0x3000: " ",
    # full-width ASCII
    **{c: chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)},
}


def _fix_text(text: str) -> str:
    try:
        import ftfy  # optional

        return ftfy.fix_text(text)
    except ImportError:
        pass
    text = text.translate(_SIMPLE_FIXES)
    text = "".join(c for c in text if c in "\t\n\r" or unicodedata.category(c) != "Cc")
    return unicodedata.normalize("NFC", text)


def clean_text(text: str) -> str:
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def _kind(c: str) -> str:
    if c.isspace():
        return "s"
    cat = unicodedata.category(c)
    if cat[0] == "L":
        return "L"
    if cat[0] == "N":
        return "N"
    return "P"


def pre_tokenize(text: str) -> list[str]:
    """CLIP's pattern: specials | contractions | letters+ | one number | other non-space+."""
    out, i, n = [], 0, len(text)
    while i < n:
        for special in (SOT, EOT):
            if text.startswith(special, i):
                out.append(special)
                i += len(special)
                break
        else:
            low = text[i:i + 3].lower()
            con = next((c for c in _CONTRACTIONS if low.startswith(c)), None)
            if con is not None:
                out.append(text[i:i + len(con)])
                i += len(con)
                continue
            k = _kind(text[i])
            if k == "s":
                i += 1
            elif k == "N":
                out.append(text[i])
                i += 1
            else:
                j = i + 1
                while j < n and _kind(text[j]) == k:
                    j += 1
                out.append(text[i:j])
                i = j
    return out


class ClipBPETokenizer:
    """CLIP BPE tokenizer. `tokenize(captions)` -> (N, context_length) int32 ids."""

    def __init__(self, merges_path: str | None = None, context_length: int = 77):
        path = merges_path or default_merges_path()
        if path is None:
            raise FileNotFoundError(
                "no CLIP BPE merges file — set the config's bpe_merges (--config.bpe_merges=PATH; "
                "`--bpe_merges PATH` for sample / evaluate) to bpe_simple_vocab_16e6.txt.gz, or set "
                "SOFTDIMO_CLIP_BPE (the package's own copy is missing: reinstall softdimo_jax)"
            )
        if not os.path.exists(path):
            raise FileNotFoundError(f"CLIP BPE merges file not found: {path!r} — check bpe_merges (or SOFTDIMO_CLIP_BPE)")
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(
                f"{path!r} is not a CLIP merges file: expected {_NUM_MERGES} merge pairs after the header"
            )
        self.context_length = context_length
        self.byte_encoder = byte_symbols()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of `best`, left to right
                if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def encode(self, text: str) -> list[int]:
        ids = []
        for tok in pre_tokenize(clean_text(text)):
            if tok in (SOT, EOT):
                ids.append(self.encoder[tok])
                continue
            mapped = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(mapped))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text if c in self.byte_decoder)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None, *,
                 pad: str = "zero") -> np.ndarray:
        """pad: "zero" pads with id 0 (open_clip.tokenize); "eot" pads with the end token
        (transformers' CLIPTokenizer with padding='max_length', as Meissonic calls it)."""
        if pad not in ("zero", "eot"):
            raise ValueError(f"pad must be 'zero' or 'eot', got {pad!r}")
        if isinstance(texts, str):
            texts = [texts]
        n_ctx = context_length or self.context_length
        out = np.full((len(texts), n_ctx), self.eot_id if pad == "eot" else 0, np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > n_ctx:
                ids = ids[:n_ctx]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = ids
        return out

    __call__ = tokenize
