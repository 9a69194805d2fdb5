"""Meissonic's text encoder: transformers' `CLIPTextModelWithProjection` (the CLIP-ViT-H-14
text tower, laion2B) as Meissonic's pipeline calls it.

The network is the shared `ClipTextTransformer` (causal pre-norm blocks, exact GELU, LN eps
1e-5); this subclass only fixes the released sizes and names the family, so a converted
checkpoint records which key mapping made it. Meissonic calls the encoder without an
attention mask on ids padded with the end token to 77, and feeds the transformer:
- `encoder_hidden_states` = hidden_states[−2]: the second-to-last block's output, no final
  LN, every position (`ClipTextOutput.penultimate`);
- `pooled_projections` = text_projection(final_layer_norm(last)[pool position])
  (`ClipTextOutput.pooled`). transformers' legacy rule for configs with `eos_token_id` 2
  (the release's) pools at argmax(ids), the first end token; other ids pool at the first
  `eos_token_id` (pool_type "eos").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softdimo_jax.models.clip_text import ClipTextTransformer


class MeissonicTextEncoder(ClipTextTransformer):
    """CLIPTextModelWithProjection, CLIP-ViT-H-14 sizes (354.0M parameters)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    heads: int = 16
    layers: int = 24
    embed_dim: int = 1024
    quick_gelu: bool = False
    pool_type: str = "argmax"
    eos_id: int = 49407


def meissonic_text_encode(model: ClipTextTransformer, params: Any, ids) -> tuple[jax.Array, jax.Array]:
    """(encoder_hidden_states (B, T, W), pooled_projections (B, E)) for Meissonic's transformer."""
    out = model.apply({"params": params}, ids)
    return out.penultimate, out.pooled[:, 0]


def meissonic_text_embeddings(model: ClipTextTransformer, params: Any, ids) -> jax.Array:
    """Token + position embeddings (hidden_states[0])."""
    return model.apply({"params": params}, ids, method=ClipTextTransformer.embed)


def meissonic_text_expected_params(model: ClipTextTransformer) -> Any:
    """The parameter shape tree (jax.eval_shape: nothing allocated)."""
    ids = jnp.zeros((1, model.context_length), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]
