"""Precomputed text conditions for Meissonic distillation: an `.npz` of prompt embeddings.

Until the CLIP-ViT-H-14 text tower is ported, Meissonic's conditions come precomputed (e.g.
with transformers' `CLIPTextModelWithProjection`, as Meissonic's pipeline calls it). The file
holds, per prompt:
  encoder_hidden_states (N, T, D)   the penultimate hidden states (hidden_states[-2]);
  pooled_projections    (N, P)      the projected pooled output (`text_embeds`);
and the CFG branch's (Di[M]O: its negative prompt; Meissonic's pipeline: the negative or
empty prompt):
  negative_encoder_hidden_states (1, T, D) or (T, D);
  negative_pooled_projections    (1, P) or (P,);
optionally `captions` (N,) strings (for logs; required by reward fine-tuning, whose rewards
read the captions' text). Each host keeps rows i::process_count, as
prompt files are shared (`softdimo_jax.data.prompts.shard_prompts`), in the same
`PromptConditions` table the MaskGen path uses (condition = encoder_hidden_states,
pooled = pooled_projections[:, None]).
"""

from __future__ import annotations

import io

import jax
import numpy as np

from softdimo_jax.data.prompts import PromptConditions
from softdimo_jax.runtime.errors import BadInput

REQUIRED = ("encoder_hidden_states", "pooled_projections", "negative_encoder_hidden_states",
            "negative_pooled_projections")


def _read_npz(path: str) -> dict:
    if path.startswith("gs://"):
        import tensorflow as tf

        if not tf.io.gfile.exists(path):
            raise BadInput(f"prompt-embedding file not found: {path!r} — pass an existing .npz")
        with tf.io.gfile.GFile(path, "rb") as f:
            data = io.BytesIO(f.read())
    else:
        data = path
    try:
        with np.load(data, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise BadInput(f"prompt-embedding file not found: {path!r} — pass an existing .npz") from None
    except (ValueError, OSError) as e:
        raise BadInput(f"{path!r} is not a readable .npz of prompt embeddings ({e}) — write it with np.savez "
                       "(no object arrays)") from None


def conditions_from_arrays(arrays: dict, *, name: str = "prompt embeddings", text_dim: int | None = None,
                           pooled_dim: int | None = None, index: int | None = None,
                           count: int | None = None, require_captions: bool = False) -> PromptConditions:
    """Checks the arrays (shapes, finiteness; widths against the model when given) and keeps
    this host's rows. `require_captions`: refuse a file without `captions` (the text-to-image
    rewards score images against the captions' text)."""
    needed = list(REQUIRED) + (["captions"] if require_captions else [])
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise BadInput(f"{name} lacks {missing} — the .npz needs {needed}")
    ehs = np.asarray(arrays["encoder_hidden_states"], np.float32)
    pooled = np.asarray(arrays["pooled_projections"], np.float32)
    neg = np.asarray(arrays["negative_encoder_hidden_states"], np.float32)
    neg_p = np.asarray(arrays["negative_pooled_projections"], np.float32).reshape(1, 1, -1)
    neg = neg[None] if neg.ndim == 2 else neg
    if ehs.ndim != 3 or pooled.ndim != 2 or pooled.shape[0] != ehs.shape[0] or ehs.shape[0] == 0:
        raise BadInput(f"{name}: encoder_hidden_states must be (N, T, D) and pooled_projections (N, P) with the "
                       f"same N >= 1, got {ehs.shape} and {pooled.shape} — one row per prompt")
    if neg.shape != (1,) + ehs.shape[1:] or neg_p.shape[-1] != pooled.shape[-1]:
        raise BadInput(f"{name}: the negative prompt's arrays {neg.shape}, {neg_p.shape} do not match the prompts' "
                       f"{ehs.shape[1:]}, ({pooled.shape[-1]},) — encode it with the same text tower")
    if text_dim is not None and ehs.shape[-1] != text_dim:
        raise BadInput(f"{name}: encoder_hidden_states width {ehs.shape[-1]} != the transformer's "
                       f"joint_attention_dim {text_dim} — use the text tower the teacher was trained with")
    if pooled_dim is not None and pooled.shape[-1] != pooled_dim:
        raise BadInput(f"{name}: pooled_projections width {pooled.shape[-1]} != the transformer's "
                       f"pooled_projection_dim {pooled_dim} — use the text tower the teacher was trained with")
    for k, v in (("encoder_hidden_states", ehs), ("pooled_projections", pooled), ("negative_*", neg),
                 ("negative_*", neg_p)):
        if not np.isfinite(v).all():
            raise BadInput(f"{name}: {k} holds NaN/inf — re-encode the prompts")
    index = jax.process_index() if index is None else int(index)
    count = jax.process_count() if count is None else int(count)
    n = ehs.shape[0]
    if n < count:
        raise BadInput(f"{name}: {n} prompts cannot be shared by {count} hosts — give at least one per host")
    captions = ([str(c) for c in np.asarray(arrays["captions"]).tolist()] if "captions" in arrays
                else [f"prompt {i}" for i in range(n)])
    rows = np.arange(index, n, count)
    return PromptConditions([captions[i] for i in rows], ehs[rows], pooled[rows][:, None, :], neg, neg_p)


def load_prompt_embeddings(path: str, **kwargs) -> PromptConditions:
    """This host's table from an .npz (see the module docstring); kwargs as conditions_from_arrays."""
    if not path:
        raise BadInput("no prompt embeddings given — set --config.prompt_embeddings to an .npz "
                       "(encoder_hidden_states, pooled_projections, negative_*)")
    return conditions_from_arrays(_read_npz(path), name=path, **kwargs)


def random_prompt_embeddings(n: int, text_len: int, text_dim: int, pooled_dim: int, seed: int = 0) -> dict:
    """Random N(0, 1) arrays in the .npz layout (the tiny smoke preset: no text tower needed)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"encoder_hidden_states": f(n, text_len, text_dim), "pooled_projections": f(n, pooled_dim),
            "negative_encoder_hidden_states": f(1, text_len, text_dim), "negative_pooled_projections": f(1, pooled_dim),
            "captions": np.asarray([f"random prompt {i}" for i in range(n)])}
