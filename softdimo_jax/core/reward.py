"""Differentiable rewards, registered by name (SPEC §1.4, §1.5), and the reward
fine-tuning phase that trains the one-step generator on them.

A reward is a pure function `apply(params, images, condition) -> (B,)` with images NHWC
float32 in [0, 1] and `condition` whatever the generator was conditioned on (class ids
(B,) for class-to-image; a text-embedding pytree for text-to-image rewards such as CLIP
score, HPS or ImageReward). Its weights travel as an explicit `params` pytree so jitted
steps take them as frozen, non-donated arguments and nothing ever updates them.

Rewards are built from the registry by name:

    reward = build_reward("digits_classifier_logprob", classifier=clf, classifier_params=p)
    rset = build_reward_set({"digits_classifier_logprob": 1.0}, classifier=clf, ...)
    total, parts = rset.total(rset.params, images, labels)

A factory receives every keyword resource the caller has (models, params, configs) and
picks what it needs, so one `build_reward_set(config.rewards, **resources)` call serves any
mix of rewards.

Reward fine-tuning (`RewardRefiner`):

    L = w_dimo · L_DiMO − w_reward · Σ_i λ_i R_i(Dec(ẽ_Dec), c)

ẽ_Dec are the decoder-side soft embeddings (for MaskBit: expected ±1 bits under
softmax(z_θ/τ), reshaped to the token grid), Dec the FROZEN tokenizer decoder, R_i the
registered rewards with their FROZEN weights. The reward gradient reaches z_θ through the
decoder and joins Di[M]O's cotangent g/B in the same generator backward (the Distiller's
`extra_loss`); the auxiliary update and EMA keep running. The reward term is a batch mean,
like the GAN term.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from softdimo_jax.core.gan import make_refine_distiller
from softdimo_jax.core.image_reward import image_reward_parts
from softdimo_jax.models.soft_embed import SoftEmbedder


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str
    apply: Callable[[Any, jax.Array, Any], jax.Array]  # (params, images, condition) -> (B,)
    params: Any = None
    # Text-to-image rewards: host-side captions -> per-prompt inputs (pytree, leading axis N),
    # computed once per prompt table; RewardSet.total hands `apply` its own entry
    # condition["reward_text"][name] (see reward_condition). None: no text side of its own.
    encode_prompts: Callable[[list], Any] | None = None


_REGISTRY: dict[str, Callable[..., Reward]] = {}

# Rewards registered by modules loaded on first use (their model code stays out of every
# import of the registry): name -> the module whose import registers it.
LAZY_REWARDS: dict[str, str] = {
    "clip_score": "softdimo_jax.core.t2i_reward",
    "hps_v2": "softdimo_jax.core.t2i_reward",
    "pickscore": "softdimo_jax.core.t2i_reward",
}


def register_reward(name: str):
    """Decorator: registers `factory(**resources) -> Reward` under `name`."""

    def deco(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    return sorted(set(_REGISTRY) | set(LAZY_REWARDS))


def build_reward(name: str, **resources) -> Reward:
    if name not in _REGISTRY and name in LAZY_REWARDS:
        importlib.import_module(LAZY_REWARDS[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered: {available_rewards()} "
                       "(add one with @register_reward)")
    reward = _REGISTRY[name](**resources)
    if not isinstance(reward, Reward):
        raise TypeError(f"reward factory {name!r} returned {type(reward).__name__}, expected Reward")
    return reward


REWARD_TEXT = "reward_text"


def reward_condition(condition, name: str):
    """What reward `name` is given: text-to-image batches carry each reward's own per-prompt
    inputs as condition["reward_text"][name] (CLIP text features, ImageReward's BERT ids and
    mask, ...); every other condition (class ids, a bare tuple) goes to all rewards as is."""
    if isinstance(condition, Mapping) and REWARD_TEXT in condition and name in condition[REWARD_TEXT]:
        return condition[REWARD_TEXT][name]
    return condition


def _check_reward_output(name, value, batch):
    if value.shape != (batch,):
        raise ValueError(f"reward {name!r} returned shape {value.shape}; a reward must return one "
                         f"scalar per image, shape ({batch},)")
    return value


@dataclasses.dataclass(frozen=True)
class RewardSet:
    """Weighted sum Σ λ_i R_i. Images are clipped to [0, 1] first (the tokenizer decoder is
    unclamped), so rewards always see valid images."""

    rewards: tuple[Reward, ...]
    weights: tuple[float, ...]

    @property
    def params(self):
        return tuple(r.params for r in self.rewards)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rewards)

    def total(self, params, images, condition):
        """-> (Σ λ_i R_i (B,), {name: R_i (B,)})."""
        if len(params) != len(self.rewards):
            raise ValueError(f"got {len(params)} reward param sets for {len(self.rewards)} rewards")
        if images.ndim != 4:
            raise ValueError(f"rewards take NHWC images, got shape {images.shape}")
        images = jnp.clip(images.astype(jnp.float32), 0.0, 1.0)
        parts = {}
        total = jnp.zeros((images.shape[0],), jnp.float32)
        for r, w, p in zip(self.rewards, self.weights, params):
            value = _check_reward_output(r.name, r.apply(p, images, reward_condition(condition, r.name))
                                         .astype(jnp.float32), images.shape[0])
            parts[r.name] = value
            total = total + w * value
        return total, parts


def build_reward_set(spec: Mapping[str, Any] | Any, **resources) -> RewardSet:
    """`spec`: {name: weight} (a dict or ConfigDict) or a sequence of (name, weight); a
    value may also be {"weight": w, **options}, the options going to that reward's factory
    (e.g. {"digits_classifier_logprob": {"weight": 1.0, "temperature": 5.0}})."""
    items = list(spec.items()) if hasattr(spec, "items") else [tuple(x) for x in spec]
    if not items:
        raise ValueError("no rewards configured: give at least one {name: weight}")
    rewards, weights = [], []
    for name, value in items:
        options = {}
        if hasattr(value, "items"):
            options = dict(value.items())
            if "weight" not in options:
                raise ValueError(f"reward {name!r}: options {sorted(options)} need a 'weight'")
            value = options.pop("weight")
        rewards.append(build_reward(name, **{**resources, **options}))
        weights.append(float(value))
    return RewardSet(tuple(rewards), tuple(weights))


# --------------------------------------------------------------------------- built-ins


def _resize_to(images, size):
    if size is None or images.shape[1:3] == tuple(size):
        return images
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size[0], size[1], c), method="linear", antialias=True)


@register_reward("digits_classifier_logprob")
def digits_classifier_logprob(*, classifier_apply=None, classifier_params=None,
                              classifier_input_size=None, temperature: float = 1.0, **_unused) -> Reward:
    """log p(c | image) under the digits evaluation classifier: our stand-in for a CLIP
    score on the embedded default. `classifier_apply(params, images) -> logits (B, classes)`
    takes NHWC [0, 1] images; `classifier_input_size` (h, w) resizes first if set.
    `temperature` > 1 scores log softmax(logits / T)[c]: the classifier is near-certain on
    most samples, where log p saturates at 0 and its gradient vanishes; a tempered score
    keeps a useful gradient (T = 1 is the evaluation reward)."""
    if temperature <= 0:
        raise ValueError(f"digits_classifier_logprob temperature must be > 0, got {temperature}")
    if classifier_apply is None or classifier_params is None:
        raise ValueError("digits_classifier_logprob needs classifier_apply and classifier_params "
                         "(the digits evaluation classifier; see evaluation/digits_classifier.py)")

    def apply(params, images, labels):
        logits = classifier_apply(params, _resize_to(images, classifier_input_size)).astype(jnp.float32)
        logits = logits / temperature
        logp = jax.nn.log_softmax(logits, axis=-1)
        labels = jnp.asarray(labels, jnp.int32)
        return jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]

    return Reward("digits_classifier_logprob", apply, classifier_params)


@register_reward("brightness")
def brightness(**_unused) -> Reward:
    """Mean pixel value: a weight-free toy reward (tests, smoke runs)."""
    return Reward("brightness", lambda params, images, condition: jnp.mean(images, axis=(1, 2, 3)), {})


# ImageReward (core.image_reward): condition = (input_ids, attention_mask) of the BERT tokenizer.
register_reward("image_reward")(lambda **resources: Reward("image_reward", *image_reward_parts(**resources)))


# --------------------------------------------------------------------------- reward fine-tuning


def soft_decode_images(tokenizer, tokenizer_params, embedder, z, grid, rng=None):
    """(B, L, S, V) generator logits -> decoded soft images (B, H, W, C), unclamped."""
    bits = embedder.decoder_bits(z, grid, rng)
    return tokenizer.apply({"params": tokenizer_params}, bits, method=type(tokenizer).decode_bits)


class RewardRefiner:
    """The reward phase. `step(state, rng, frozen)` with frozen = {"teacher", "tokenizer",
    "reward"} (reward = `reward_set.params`) -> (DistillState, metrics)."""

    def __init__(self, adapter, distill_config, reward_config, tokenizer, reward_set, grid, mesh=None):
        self.adapter = adapter
        self.config = reward_config
        self.tokenizer = tokenizer
        self.reward_set = reward_set
        self.grid = tuple(grid)
        self.distiller = make_refine_distiller(adapter, distill_config, reward_config, mesh)
        self.mesh = self.distiller.mesh
        self.embedder = SoftEmbedder(mode=str(reward_config.soft_mode), tau=float(reward_config.soft_tau))

    def init_state(self, dimo_state):
        return self.distiller.restart_from(dimo_state)

    def reward_loss(self, tokenizer_params, reward_params, z, labels, rng):
        images = soft_decode_images(self.tokenizer, tokenizer_params, self.embedder, z, self.grid, rng)
        total, parts = self.reward_set.total(reward_params, images, labels)
        stats = {"reward": jnp.mean(total)}
        stats.update({f"reward_{k}": jnp.mean(v) for k, v in parts.items()})
        return -float(self.config.w_reward) * jnp.mean(total), (stats, None)

    def step(self, state, rng, frozen):
        extra = lambda z, labels, k: self.reward_loss(frozen["tokenizer"], frozen["reward"], z, labels, k)
        new_state, metrics, _ = self.distiller.step_fn(state, frozen["teacher"], rng, extra_loss=extra)
        metrics = dict(metrics, loss=metrics["gen_loss"])
        return new_state, metrics

    def trainer_step_fn(self):
        """`step_fn(state, batch, rng, step, frozen)` for runtime.trainer.Trainer (data-free)."""
        return lambda state, batch, rng, step, frozen: self.step(state, rng, frozen)
