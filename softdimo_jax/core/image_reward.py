"""ImageReward as a differentiable reward: images in [0, 1] + prompt tokens -> one score per image.

    r = image_reward(model, params, images, input_ids, attention_mask)   # (B,)

images: NHWC float in [0, 1], any size (a decoder's output goes straight in, no uint8
rounding); they take ImageReward's preprocessing as its float tensor path —
`models.image_preprocess.clip_preprocess`: bicubic antialiased resize of the shorter side to
`model.image_size`, torchvision's centre crop, OpenAI CLIP mean/std — then the BLIP ViT, the
BERT cross-encoder and the head, and the published normalisation (r − mean)/std
(`score_gard`). input_ids / attention_mask: (B, T) from `data.wordpiece.WordPieceTokenizer`
(ImageReward pads to 35 and truncates longer prompts; see there).

`params` are the frozen ImageReward params (a converted `blip` checkpoint), passed as an
explicit argument so a jitted step takes them as a sharded, non-donated input.

In the reward registry (`core.reward`) the entry `image_reward` is built by
`image_reward_parts(image_reward_model=..., image_reward_params=...)`; its condition is
`(input_ids, attention_mask)` or a mapping with those two keys (optionally nested under
"image_reward", so one condition dict can serve several rewards).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.models.blip import ImageReward, image_reward_expected_params
from softdimo_jax.models.image_preprocess import clip_preprocess
from softdimo_jax.runtime.errors import BadInput


class ImageRewardInputError(BadInput):
    """The reward was given another model or checkpoint than ImageReward's."""


def image_reward(model: ImageReward, params: Any, images, input_ids, attention_mask):
    """(B, H, W, 3) images in [0, 1] -> ImageReward's normalised reward (B,), differentiable in images."""
    x = clip_preprocess(images, model.image_size, crop="torchvision")
    out = model.apply({"params": params}, x, input_ids, attention_mask)
    return out.reward[:, 0]


def prompt_tokens(condition) -> tuple[Any, Any]:
    """(input_ids, attention_mask) from the reward condition (see module docstring)."""
    if isinstance(condition, Mapping):
        condition = condition.get("image_reward", condition)
    if isinstance(condition, Mapping):
        if "input_ids" not in condition or "attention_mask" not in condition:
            raise ValueError(f"image_reward's condition needs 'input_ids' and 'attention_mask' (the BERT "
                             f"tokenizer's output), got keys {sorted(condition)}")
        return condition["input_ids"], condition["attention_mask"]
    if isinstance(condition, (tuple, list)) and len(condition) == 2:
        return condition[0], condition[1]
    raise ValueError("image_reward's condition must be (input_ids, attention_mask) from "
                     f"data.wordpiece.WordPieceTokenizer, got {type(condition).__name__}")


def check_prompt_ids(model: ImageReward, input_ids, attention_mask) -> None:
    """Host-side check of tokenized prompts against the model (inside jit an id past the
    vocabulary would be clamped silently): shapes, id range, length."""
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ImageRewardInputError(f"prompt ids {ids.shape} and mask {mask.shape} must both be (B, T) — pass the "
                                    "two arrays of WordPieceTokenizer(prompts)")
    if ids.shape[1] > model.max_position_embeddings:
        raise ImageRewardInputError(f"prompts of {ids.shape[1]} tokens exceed ImageReward's "
                                    f"{model.max_position_embeddings} positions — tokenize with max_length 35")
    if ids.size and (ids.min() < 0 or ids.max() >= model.vocab_size):
        raise ImageRewardInputError(f"prompt ids reach {int(ids.max())}, outside ImageReward's vocabulary of "
                                    f"{model.vocab_size} — tokenize with bert-base-uncased's vocab.txt")


def check_image_reward_params(model, params) -> None:
    """One-line refusal of a model or params tree that is not ImageReward's (e.g. a CLIP
    checkpoint handed to image_reward)."""
    if not isinstance(model, ImageReward):
        raise ImageRewardInputError(
            f"image_reward needs the ImageReward model, got {type(model).__name__} — load the converted "
            "checkpoint of `python -m softdimo_jax.convert --model blip ImageReward.pt DST`")
    want = image_reward_expected_params(model)
    got_tree = jax.tree.structure(params)
    if got_tree != jax.tree.structure(want):
        top = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ImageRewardInputError(
            f"image_reward params do not belong to ImageReward (top-level entries {top}) — pass the params of a "
            "checkpoint converted with --model blip")
    bad = [(np.shape(a), b.shape) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want))
           if tuple(np.shape(a)) != tuple(b.shape)]
    if bad:
        raise ImageRewardInputError(
            f"image_reward params have other sizes than the model ({len(bad)} arrays, e.g. {bad[0][0]} vs "
            f"{bad[0][1]}) — load model and params together from the converted checkpoint")


def image_reward_parts(*, image_reward_model=None, image_reward_params=None,
                       **_unused) -> tuple[Callable[[Any, Any, Any], Any], Any]:
    """The registry entry's (apply(params, images, condition) -> (B,), params)."""
    if image_reward_model is None or image_reward_params is None:
        raise ImageRewardInputError(
            "image_reward needs image_reward_model and image_reward_params — convert ImageReward.pt with "
            "`python -m softdimo_jax.convert --model blip` and load it with runtime.converted.load_converted")
    check_image_reward_params(image_reward_model, image_reward_params)
    model = image_reward_model

    def apply(params, images, condition):
        ids, mask = prompt_tokens(condition)
        return image_reward(model, params, images, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))

    return apply, image_reward_params
