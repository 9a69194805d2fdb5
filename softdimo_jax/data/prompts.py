"""Prompt files for text-to-image distillation: captions -> a table of MaskGen conditions.

A prompt file holds one caption per line (UTF-8; blank lines skipped; local or gs:// path).
Each host keeps its share of the captions (line i goes to host i mod process_count), encodes
them ONCE with the OpenCLIP text tower into a table of MaskGen conditions (penultimate
tokens (N, T, W) and pooled (N, 1, E)), and feeds the distillation step its own rows of
every global batch (`PromptConditions.batch_fn`), drawn uniformly from its table by a numpy
rng seeded with (seed, step, process index): a pure function of the step, so a resumed run
sees the same captions. The null condition for CFG is the encoding of `null_prompt` (the
empty caption, MaskGen's unconditional input, or a negative prompt).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.data.clip_bpe import ClipBPETokenizer
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.errors import BadInput


class PromptFileError(BadInput, FileNotFoundError):
    """A prompt file that is missing, empty or not UTF-8 text."""


def read_prompts(path: str) -> list[str]:
    """Captions of a prompt file, one per non-blank line (surrounding whitespace stripped)."""
    if not path:
        raise BadInput("no prompt file given — set the config's prompt_file to a text file with one caption per line")
    if path.startswith("gs://"):
        import tensorflow as tf

        if not tf.io.gfile.exists(path):
            raise PromptFileError(f"prompt file not found: {path!r} — check the path")
        with tf.io.gfile.GFile(path, "rb") as f:
            raw = f.read()
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise PromptFileError(f"prompt file not found: {path!r} — pass a text file, one caption per line") from None
        except IsADirectoryError:
            raise PromptFileError(f"prompt file {path!r} is a directory — pass a text file, one caption per line") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompt file {path!r} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}) — "
                              "save it as UTF-8 text") from None
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise PromptFileError(f"prompt file {path!r} holds no captions (empty or only blank lines) — put one "
                              "caption per line")
    return captions


def shard_prompts(captions: Sequence[str], index: int | None = None, count: int | None = None) -> list[str]:
    """This host's captions: every `count`-th one starting at `index` (default: the JAX
    process index / count)."""
    index = jax.process_index() if index is None else int(index)
    count = jax.process_count() if count is None else int(count)
    if not 0 <= index < count:
        raise ValueError(f"host index {index} outside [0, {count})")
    mine = list(captions[index::count])
    if not mine:
        raise ValueError(
            f"{len(captions)} captions cannot be shared by {count} hosts (host {index} gets none); "
            "give the prompt file at least one caption per host"
        )
    return mine


@dataclasses.dataclass
class PromptConditions:
    """This host's encoded captions and the null condition (numpy, float32)."""

    captions: list[str]
    condition: np.ndarray  # (N, T, W) penultimate OpenCLIP tokens: MaskGen's condition
    pooled: np.ndarray  # (N, 1, E)
    null_condition: np.ndarray  # (1, T, W)
    null_pooled: np.ndarray  # (1, 1, E)
    # Other per-caption entries (leading axis N) that travel with the rows: TA-TiTok's
    # `text_guidance` (B, T, W), text-to-image rewards' `reward_text` {name: pytree}.
    extra: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return self.condition.shape[0]

    def rows(self, idx) -> dict:
        out = {"condition": self.condition[idx], "pooled": self.pooled[idx]}
        out.update(jax.tree.map(lambda x: x[idx], self.extra))
        return out

    def with_extra(self, **entries) -> "PromptConditions":
        """A copy with more per-caption entries (each leaf's leading axis = len(self))."""
        for name, tree in entries.items():
            bad = [np.shape(x) for x in jax.tree.leaves(tree) if np.shape(x)[:1] != (len(self),)]
            if bad:
                raise ValueError(f"prompt-table entry {name!r} needs {len(self)} rows (one per caption), got shapes {bad}")
        return dataclasses.replace(self, extra={**self.extra, **entries})

    def batch_fn(self, global_batch: int, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None) -> Callable[[int], dict]:
        """fn(step) -> this host's rows {"condition": (b, T, W), "pooled": (b, 1, E)} of the
        global batch (b = global_batch / process_count), uniform over the host's captions."""
        index = jax.process_index() if process_index is None else int(process_index)
        count = jax.process_count() if process_count is None else int(process_count)
        if global_batch % count:
            raise ValueError(f"global batch {global_batch} is not divisible by the {count} hosts")
        local = global_batch // count
        n = len(self)

        def fn(step: int) -> dict:
            rng = np.random.default_rng([int(seed), int(step), index])
            return self.rows(rng.integers(0, n, local))

        return fn


def clip_tokenizer(bpe_merges: str | None, context_length: int) -> ClipBPETokenizer:
    """The CLIP BPE tokenizer from the config's / CLI's `bpe_merges` (else $SOFTDIMO_CLIP_BPE,
    else open_clip's file)."""
    return ClipBPETokenizer(bpe_merges or None, context_length=context_length)


def tokenize_checked(clip_model, tokenizer, texts: Sequence[str], pad: str = "zero") -> np.ndarray:
    """(n, context_length) ids of `texts`, refused in one line when an id lies outside the
    text tower's vocabulary (a small tower with the real BPE tokenizer would otherwise
    embed it as NaN / garbage) or the length differs from the tower's context. `pad`:
    "zero" (open_clip) or "eot" (transformers' max_length padding, as Meissonic calls it)."""
    texts = list(texts)
    ids = np.asarray(tokenizer.tokenize(texts) if pad == "zero" else tokenizer.tokenize(texts, pad=pad), np.int32)
    vocab, ctx = int(clip_model.vocab_size), int(clip_model.context_length)
    if ids.ndim != 2 or ids.shape[1] != ctx:
        raise BadInput(f"the tokenizer gives ids of shape {ids.shape}, the text tower reads (n, {ctx}) — "
                       "pass the tokenizer (bpe_merges) made for this text encoder")
    bad = np.argwhere((ids < 0) | (ids >= vocab))
    if bad.size:
        row, col = bad[0]
        raise BadInput(f"prompt {texts[row]!r} tokenises to id {int(ids[row, col])}, outside the text tower's "
                       f"vocabulary of {vocab} — pass the text encoder made for this tokenizer (bpe_merges), "
                       "or a tokenizer with that vocabulary")
    return ids


@functools.partial(jax.jit, static_argnames=("clip_model",))
def _encode(clip_model, clip_params, ids):
    out = clip_model.apply({"params": clip_params}, ids)
    return out.penultimate, out.pooled, out.text_guidance


def encode_prompt_table(clip_model, clip_params, tokenizer, captions: Sequence[str], *,
                        null_prompt: str = "", chunk: int = 64, text_guidance: bool = False,
                        pad: str = "zero", mesh=None) -> PromptConditions:
    """Encodes `captions` (and `null_prompt`) once with the text tower, in fixed-size chunks
    (the last one padded) so one compiled forward serves every chunk. `text_guidance`: also
    keep the final-LN tokens (TA-TiTok's decoder input, for decoding during training) as
    the table's `extra["text_guidance"]`. `pad`: as `tokenize_checked`. `mesh`: split each
    chunk's rows over its devices (the chunk rounded up to a multiple of its size), the
    tower replicated; it must hold only this process's devices (each host encodes its own
    share, e.g. `local_mesh()`).

    tokenizer: anything with `tokenize(list[str]) -> (n, context_length) int ids`
    (softdimo_jax.data.clip_bpe.ClipBPETokenizer)."""
    captions = list(captions)
    if not captions:
        raise ValueError("no captions to encode")
    texts = captions + [null_prompt]
    if mesh is not None:
        chunk = -(-max(int(chunk), 1) // mesh.size) * mesh.size
        clip_params = jax.device_put(clip_params, meshlib.replicated(mesh))
    conds, pooled, guide = [], [], []
    for i in range(0, len(texts), chunk):
        part = texts[i : i + chunk]
        ids = tokenize_checked(clip_model, tokenizer, part + [""] * (chunk - len(part)), pad)
        ids = jnp.asarray(ids) if mesh is None else jax.device_put(ids, meshlib.batch_sharding(mesh, 2))
        c, p, g = _encode(clip_model, clip_params, ids)
        conds.append(np.asarray(c, np.float32)[: len(part)])
        pooled.append(np.asarray(p, np.float32)[: len(part)])
        if text_guidance:
            guide.append(np.asarray(g, np.float32)[: len(part)])
    cond, pool = np.concatenate(conds), np.concatenate(pooled)
    extra = {"text_guidance": np.concatenate(guide)[:-1]} if text_guidance else {}
    return PromptConditions(captions, cond[:-1], pool[:-1], cond[-1:], pool[-1:], extra)


def load_prompt_conditions(path: str, clip_model, clip_params, tokenizer, *, null_prompt: str = "",
                           chunk: int = 64, index: int | None = None, count: int | None = None,
                           text_guidance: bool = False, pad: str = "zero", mesh=None) -> PromptConditions:
    """read_prompts + shard_prompts (this host's share) + encode_prompt_table."""
    mine = shard_prompts(read_prompts(path), index, count)
    return encode_prompt_table(clip_model, clip_params, tokenizer, mine, null_prompt=null_prompt, chunk=chunk,
                               text_guidance=text_guidance, pad=pad, mesh=mesh)


def local_mesh():
    """A mesh of this process's devices only (per-host prompt encoding)."""
    return meshlib.make_mesh(devices=jax.local_devices())


def null_conditions_kwargs(table: PromptConditions) -> dict[str, Any]:
    """The keyword arguments `distill.make_adapter` needs for a MaskGen teacher."""
    return {"null_condition": table.null_condition, "null_pooled": table.null_pooled}
