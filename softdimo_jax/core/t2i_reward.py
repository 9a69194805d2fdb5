"""Text-to-image rewards (SPEC §1.4): CLIP score, HPS v2, PickScore, and reward fine-tuning
of a text-to-image one-step generator (MaskGen, Meissonic) through soft embeddings.

Rewards (registered in `core.reward`'s registry, so `build_reward_set` mixes them with any
other reward):

    clip_score  cos(img, txt) with OpenCLIP ViT-L-14 (the paper's CLIP column, ×1)
    hps_v2      cos(img, txt) with HPS v2 / v2.1 (OpenCLIP ViT-H-14 fine-tuned; the paper's
                HPS column is this ×100)
    pickscore   exp(logit_scale)·cos(img, txt) with PickScore (HF CLIPModel, CLIP-H)

Each is a pure function `apply(params, images, condition) -> (B,)`: images NHWC in [0, 1]
of any size go through the differentiable preprocessing (`models.image_preprocess`:
antialiased bicubic resize + centre crop — torchvision's anchor for the OpenCLIP models,
transformers' floor for PickScore — + CLIP mean/std) into the image tower. `params` holds
only what the step needs — the image tower and the logit scale — as a frozen, non-donated
jit argument. The text side is per prompt, so it is computed ONCE per prompt table on the
host: `Reward.encode_prompts(captions) -> (N, E)` normalised text features, which travel
with the text conditions as `condition["reward_text"][name]` (see `prompt_reward_inputs`);
`RewardSet.total` hands each reward its own entry.

Resources a factory reads (passed to `build_reward_set(spec, **resources)`):
    t2i_reward_models = {"hps_v2": (CLIP module, params), "pickscore": (...), ...}
    prompt_tokenizer  = CLIP BPE tokenizer (`data.clip_bpe.ClipBPETokenizer`)
Options per reward (config `{name: {"weight": w, ...}}`): `truncate_prompts` (default
False: a prompt longer than the model's context is refused; the originals truncate).

Other text-to-image rewards plug in the same way: a registered `Reward` whose `apply` takes
its per-prompt inputs as the condition, with `encode_prompts` (host side, captions -> any
pytree with leading axis N) or an entry in `prompt_reward_inputs(..., encoders=)` (ImageReward
keeps its BERT (input_ids, attention_mask) there and runs its text encoder in the step,
since it cross-attends to the image).

Reward fine-tuning (`T2IRewardRefiner`):

    L = w_dimo · L_DiMO − w_reward · Σ_i λ_i R_i(Dec(softmax(z_θ/τ) @ C_Dec[, text]), c)

with Dec the frozen decoder of the generator's family (`soft_decode_t2i`): TA-TiTok for
MaskGen (text-guided by the caption's final-LN text tokens), Meissonic's VQ model for
Meissonic (64x64 soft latents -> 1024 px), the reward gradient joining Di[M]O's cotangent on
z_θ (`Distiller.step_fn(extra_loss=)`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.core.gan import make_refine_distiller
from softdimo_jax.core.reward import Reward, register_reward, reward_condition
from softdimo_jax.models.clip import CLIP, HFCLIPModel, clip_vision_tower, l2_normalize
from softdimo_jax.models.image_preprocess import clip_preprocess
from softdimo_jax.models.meissonic_vq import MeissonicVQModel
from softdimo_jax.models.soft_embed import SoftEmbedder

# reward name -> whether the score carries exp(logit_scale). The crop anchor follows the
# checkpoint's origin: transformers' processor floors (PickScore), OpenCLIP's torchvision rounds.
CLIP_REWARDS = {"clip_score": False, "hps_v2": False, "pickscore": True}


# --------------------------------------------------------------------------- prompts


def clip_prompt_ids(tokenizer, captions: Sequence[str], context_length: int, *, truncate: bool = False) -> np.ndarray:
    """Captions -> (N, context_length) int32 CLIP ids ([SOT] text [EOT], pad 0).

    A caption whose ids (with SOT/EOT) exceed the context is refused unless `truncate`
    (then cut with EOT kept last, as open_clip and transformers do)."""
    captions = list(captions)
    if not truncate and hasattr(tokenizer, "encode"):
        for i, text in enumerate(captions):
            n = len(tokenizer.encode(text)) + 2
            if n > context_length:
                short = text if len(text) <= 60 else text[:57] + "..."
                raise ValueError(
                    f"prompt {i} ({short!r}) has {n} CLIP tokens, more than the reward model's context of "
                    f"{context_length} — shorten it, or set the reward option truncate_prompts=True "
                    "(the originals truncate)"
                )
    ids = np.asarray(tokenizer.tokenize(captions, context_length), np.int32)
    if ids.shape != (len(captions), context_length):
        raise ValueError(f"tokenizer returned ids of shape {ids.shape}, expected ({len(captions)}, {context_length})")
    return ids


@functools.partial(jax.jit, static_argnums=0)
def _text_features(model, params, ids):
    return l2_normalize(model.apply({"params": params}, ids, method=CLIP.encode_text))


def clip_text_features(model: CLIP, params, ids, *, chunk: int = 64) -> np.ndarray:
    """(N, T) ids -> (N, E) normalised text features (float32 numpy), in fixed-size chunks
    (the last padded) so one compiled forward serves any prompt count."""
    ids = np.asarray(ids, np.int32)
    out = []
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        pad = np.zeros((chunk - len(part), ids.shape[1]), np.int32)
        out.append(np.asarray(_text_features(model, params, jnp.asarray(np.concatenate([part, pad]))))[: len(part)])
    return np.concatenate(out).astype(np.float32)


def prompt_reward_inputs(reward_set, captions: Sequence[str], encoders: Mapping[str, Any] | None = None) -> dict:
    """{reward name: per-prompt inputs (leading axis N)} for every reward of `reward_set`
    with a text side — its own `encode_prompts`, else `encoders[name](captions)` (e.g.
    ImageReward's BERT tokenizer: captions -> (input_ids, attention_mask)): computed once per
    prompt table, then indexed with the text conditions (the `reward_text` entry of a
    conditions batch; `RewardSet.total` hands each reward its own entry)."""
    captions = list(captions)
    encoders = dict(encoders or {})
    out = {}
    for r in reward_set.rewards:
        fn = r.encode_prompts or encoders.get(r.name)
        if fn is not None:
            out[r.name] = jax.tree.map(np.asarray, fn(captions))
    return out


# --------------------------------------------------------------------------- CLIP rewards


def image_features(model: CLIP, visual_params, images, *, crop: str):
    """NHWC [0, 1] images (any size) -> (B, E) unnormalised image features (differentiable)."""
    x = clip_preprocess(images, model.image_size, crop=crop)
    return clip_vision_tower(model).apply({"params": visual_params}, x)


def _clip_reward(name: str, *, t2i_reward_models: Mapping[str, Any] | None = None, prompt_tokenizer=None,
                 truncate_prompts: bool = False, **_unused) -> Reward:
    scaled = CLIP_REWARDS[name]
    if not t2i_reward_models or name not in t2i_reward_models:
        raise ValueError(
            f"reward {name!r} needs its converted model: pass t2i_reward_models={{{name!r}: (model, params)}} "
            f"(set config.reward_checkpoints.{name} to a checkpoint converted with python -m softdimo_jax.convert)"
        )
    model, params = t2i_reward_models[name]
    if not isinstance(model, CLIP):
        fam = "hfclip" if name == "pickscore" else "openclip"
        raise ValueError(
            f"reward {name!r} needs a CLIP checkpoint, got a {type(model).__name__} (another reward family) — "
            f"convert the {name} checkpoint with python -m softdimo_jax.convert --model {fam}"
        )
    crop = "floor" if isinstance(model, HFCLIPModel) else "torchvision"
    frozen = {"visual": params["visual"], "logit_scale": params["logit_scale"]}

    def apply(p, images, condition):
        txt = reward_condition(condition, name)  # (B, E) normalised text features
        cos = jnp.sum(l2_normalize(image_features(model, p["visual"], images, crop=crop)) * txt, axis=-1)
        return jnp.exp(p["logit_scale"]) * cos if scaled else cos

    def encode_prompts(captions):
        if prompt_tokenizer is None:
            raise ValueError(f"reward {name!r} needs prompt_tokenizer (the CLIP BPE tokenizer) to encode prompts")
        ids = clip_prompt_ids(prompt_tokenizer, captions, model.context_length, truncate=bool(truncate_prompts))
        return clip_text_features(model, params, ids)

    return Reward(name, apply, frozen, encode_prompts)


@register_reward("clip_score")
def clip_score(**resources) -> Reward:
    """CLIP score: cosine of image and caption features (OpenCLIP ViT-L-14)."""
    return _clip_reward("clip_score", **resources)


@register_reward("hps_v2")
def hps_v2(**resources) -> Reward:
    """HPS v2 / v2.1: cosine of image and caption features (fine-tuned OpenCLIP ViT-H-14)."""
    return _clip_reward("hps_v2", **resources)


@register_reward("pickscore")
def pickscore_reward(**resources) -> Reward:
    """PickScore: exp(logit_scale)·cosine (HF CLIPModel, CLIP-H; floor crop as its processor)."""
    return _clip_reward("pickscore", **resources)


# --------------------------------------------------------------------------- fine-tuning


def soft_decode_t2i(decoder, decoder_params, embedder: SoftEmbedder, z, conditions, rng=None, *, grid=None):
    """Generator logits -> decoded soft images (B, H, W, 3), unclamped: the frozen decoder on
    softmax(z/τ) @ its codebook (SPEC §1.2, decoder side).

    TA-TiTok (MaskGen): z (B, L, K) or (B, L, 1, K), 1-D tokens, the decoder guided by the
    caption (`conditions["text_guidance"]`). Meissonic's VQ: a 2-D token grid, z (B, H, W, K)
    as the transformer returns it, or (B, L, 1, K) / (B, L, K) with `grid` = (H, W); no text."""
    if isinstance(decoder, MeissonicVQModel):
        if grid is not None:
            z = z.reshape(z.shape[0], *grid, z.shape[-1])
        elif z.ndim != 4 or z.shape[2] == 1:
            raise ValueError(f"Meissonic's VQ decodes a (B, H, W, K) token grid, got logits {z.shape}: pass grid=(H, W)")
        probs = embedder.probs(z, rng)
        return decoder.apply({"params": decoder_params}, probs, method=MeissonicVQModel.decode_soft)
    if "text_guidance" not in conditions:
        raise ValueError("TA-TiTok decodes with the captions' text_guidance (its text input): add it to the "
                         "conditions batch (data.prompts.load_prompt_conditions(..., text_guidance=True))")
    if z.ndim == 4:
        z = z[:, :, 0]
    probs = embedder.probs(z, rng)
    return decoder.apply({"params": decoder_params}, probs, conditions["text_guidance"],
                         method=type(decoder).decode_soft)


def check_decoder_fits(generator, decoder) -> None:
    """The decoder must read the generator's codes (and, for TA-TiTok, its token count)."""
    if isinstance(decoder, MeissonicVQModel):
        if decoder.num_vq_embeddings != generator.codebook_size:
            raise ValueError(f"the VQ model has {decoder.num_vq_embeddings} codes but the generator predicts "
                             f"{generator.codebook_size} — use the vqvae/ that belongs to the transformer")
        return
    if decoder.codebook_size != generator.codebook_size or decoder.num_latent_tokens != generator.seq_len:
        raise ValueError(
            f"tokenizer ({decoder.num_latent_tokens} tokens of {decoder.codebook_size} codes) does not fit "
            f"the generator ({generator.seq_len} tokens of {generator.codebook_size} codes)"
        )


class T2IRewardRefiner:
    """The text-to-image reward phase of a one-step MaskGen (decoder: TA-TiTok) or Meissonic
    (decoder: its VQ model; the adapter's token grid lays out the logits).
    `step(state, batch, rng, frozen)` with batch the step's conditions {"condition", "pooled",
    ["text_guidance" (TA-TiTok),] "reward_text": {name: ...}} and frozen = {"teacher",
    "tokenizer" (the decoder), "reward" (= reward_set.params)}."""

    def __init__(self, adapter, distill_config, reward_config, decoder, reward_set, mesh=None):
        self.adapter = adapter
        self.config = reward_config
        self.decoder = decoder
        check_decoder_fits(adapter.student, decoder)
        self.grid = tuple(adapter.grid) if isinstance(decoder, MeissonicVQModel) else None
        self.reward_set = reward_set
        self.distiller = make_refine_distiller(adapter, distill_config, reward_config, mesh)
        self.mesh = self.distiller.mesh
        self.embedder = SoftEmbedder(mode=str(reward_config.soft_mode), tau=float(reward_config.soft_tau))

    def init_state(self, dimo_state):
        return self.distiller.restart_from(dimo_state)

    def reward_loss(self, decoder_params, reward_params, z, labels, rng):
        k = rng if self.embedder.mode.startswith("gumbel") else None
        images = soft_decode_t2i(self.decoder, decoder_params, self.embedder, z, labels, k, grid=self.grid)
        total, parts = self.reward_set.total(reward_params, images, labels)
        stats = {"reward": jnp.mean(total)}
        stats.update({f"reward_{k}": jnp.mean(v) for k, v in parts.items()})
        return -float(self.config.w_reward) * jnp.mean(total), (stats, None)

    def step(self, state, batch, rng, frozen):
        extra = lambda z, labels, k: self.reward_loss(frozen["tokenizer"], frozen["reward"], z, labels, k)
        new_state, metrics, _ = self.distiller.step_fn(state, frozen["teacher"], rng, batch, extra_loss=extra)
        return new_state, dict(metrics, loss=metrics["gen_loss"])

    def trainer_step_fn(self):
        """`step_fn(state, batch, rng, step, frozen)` for runtime.trainer.Trainer."""
        return lambda state, batch, rng, step, frozen: self.step(state, batch, rng, frozen)
