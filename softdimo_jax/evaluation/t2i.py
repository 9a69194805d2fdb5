"""Text-to-image evaluation: score samples against their prompts with any registered reward
(CLIP score, HPS v2, PickScore, ImageReward, ...), and write / read GenEval-ready folders.

GenEval (github.com/djghosh13/geneval; CUDA-only, PyTorch) reads its prompts from
`evaluation_metadata.jsonl` (one JSON object per line: "prompt", "tag", "include", ...) and
expects one folder per prompt:

    OUT/00000/metadata.jsonl      that prompt's metadata line, unchanged
    OUT/00000/samples/00000.png   its samples (uint8 RGB PNGs)
    OUT/00001/...

so that `python evaluation/evaluate_images.py OUT --outfile results.jsonl` runs on our samples.

Scoring: `score_images(reward_set, images, captions)` -> {reward name: (N,), "total": (N,)};
each distinct caption's reward text side is computed once (`Reward.encode_prompts`), images
go through the rewards' own differentiable preprocessing at their stored size (uint8 PNGs
are read as x/255, as the originals' ToTensor).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from softdimo_jax.core import reward as rewards
from softdimo_jax.core.reward import REWARD_TEXT
from softdimo_jax.core.t2i_reward import prompt_reward_inputs
from softdimo_jax.data.clip_bpe import ClipBPETokenizer
from softdimo_jax.evaluation.fid import to_uint8
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.converted import load_converted

METADATA = "metadata.jsonl"
SAMPLES = "samples"


# --------------------------------------------------------------------------- prompts


def read_prompt_metadata(path: str) -> list[dict]:
    """Prompts with their metadata: a GenEval `*.jsonl` (one JSON object with "prompt" per
    line) or a plain text file (one caption per line -> {"prompt": caption})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path!r} — give a .jsonl (GenEval metadata) or a .txt file")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path!r} holds no prompts — put one prompt (or one JSON object) per line")
    if not path.endswith(".jsonl"):
        return [{"prompt": line} for line in lines]
    out = []
    for i, line in enumerate(lines):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path!r} line {i + 1} is not JSON ({e.msg}) — one JSON object per line") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path!r} line {i + 1} has no \"prompt\" string — GenEval metadata lines need one")
        out.append(item)
    return out


def reward_set_from_checkpoints(checkpoints: Mapping[str, str], weights: Mapping[str, Any] | None = None, *,
                                bpe_merges: str | None = None, **resources):
    """A RewardSet of text-to-image rewards from converted checkpoints: `checkpoints` =
    {reward name: converted folder} (e.g. {"hps_v2": "ckpt/hps_v2"}), `weights` = {name: λ or
    {"weight": λ, **options}} (default 1.0 each; names without a weight are left out).
    Extra keyword `resources` go to every factory (e.g. another reward's tokenizer)."""
    weights = dict(weights) if weights is not None else {name: 1.0 for name in checkpoints}
    if not weights:
        raise ValueError("no rewards chosen — name at least one, e.g. hps_v2=1.0")
    models = {name: load_converted(path) for name, path in checkpoints.items() if path}
    # Each model also as `<name>_model` / `<name>_params`, the resources other factories read
    # (image_reward: image_reward_model, image_reward_params).
    named = {f"{n}_{part}": x for n, mp in models.items() for part, x in zip(("model", "params"), mp)}
    return rewards.build_reward_set(weights, t2i_reward_models=models,
                                    prompt_tokenizer=ClipBPETokenizer(bpe_merges or None), **{**named, **resources})


# --------------------------------------------------------------------------- GenEval folders


def write_geneval_folder(out_dir: str, metadata: Sequence[dict], images_per_prompt: Sequence[Any], *,
                         overwrite: bool = False) -> str:
    """Writes OUT/<index:05>/{metadata.jsonl, samples/<k:05>.png} for each prompt.

    images_per_prompt[i]: (n, H, W, 3) images of prompt i, float in [0, 1] or uint8."""
    if len(metadata) != len(images_per_prompt):
        raise ValueError(f"{len(metadata)} prompts but images for {len(images_per_prompt)} — one image set per prompt")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty — choose a new folder or pass overwrite=True")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for i, (meta, images) in enumerate(zip(metadata, images_per_prompt)):
        folder = os.path.join(out_dir, f"{i:05d}")
        os.makedirs(os.path.join(folder, SAMPLES))
        with open(os.path.join(folder, METADATA), "w", encoding="utf-8") as f:
            f.write(json.dumps(meta) + "\n")
        for k, img in enumerate(to_uint8(images)):
            Image.fromarray(img).save(os.path.join(folder, SAMPLES, f"{k:05d}.png"))
    return out_dir


def read_geneval_folder(folder: str) -> list[tuple[dict, np.ndarray]]:
    """[(metadata, uint8 images (n, H, W, 3))] per prompt folder, in folder order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"sample folder not found: {folder!r}")
    out = []
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            continue
        if not os.path.isfile(os.path.join(sub, METADATA)) or not os.path.isdir(os.path.join(sub, SAMPLES)):
            raise ValueError(f"{sub} is not a GenEval prompt folder — it needs {METADATA} and {SAMPLES}/")
        with open(os.path.join(sub, METADATA), encoding="utf-8") as f:
            meta = json.loads(f.readline())
        files = sorted(p for p in os.listdir(os.path.join(sub, SAMPLES)) if p.lower().endswith((".png", ".jpg", ".jpeg")))
        imgs = [np.asarray(Image.open(os.path.join(sub, SAMPLES, p)).convert("RGB")) for p in files]
        out.append((meta, np.stack(imgs) if imgs else np.zeros((0, 1, 1, 3), np.uint8)))
    if not out:
        raise ValueError(f"{folder!r} holds no prompt folders (expected 00000/, 00001/, ...)")
    return out


def generate_geneval_folder(sample_fn: Callable[[list[str], Any], Any], metadata: Sequence[dict], out_dir: str, *,
                            images_per_prompt: int = 4, seed: int = 0, overwrite: bool = False) -> str:
    """Samples `images_per_prompt` images per prompt with `sample_fn(captions, rng) -> (B, H, W, 3)
    in [0, 1]` (one call per prompt, the caption repeated; rng = fold_in(PRNGKey(seed), index))
    and writes the GenEval folder."""
    sets = []
    for i, meta in enumerate(metadata):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        imgs = np.asarray(sample_fn([meta["prompt"]] * images_per_prompt, rng))
        if imgs.shape[0] != images_per_prompt:
            raise ValueError(f"sample_fn returned {imgs.shape[0]} images for {images_per_prompt} captions")
        sets.append(imgs)
    return write_geneval_folder(out_dir, metadata, sets, overwrite=overwrite)


# --------------------------------------------------------------------------- scoring


# id(reward set) -> (the set, its jitted total): one compile per reward set and batch shape,
# however many calls score it (the evaluate CLI scores a sample set batch by batch).
_JITTED: dict = {}


def _jitted_total(reward_set):
    hit = _JITTED.get(id(reward_set))
    if hit is None or hit[0] is not reward_set:
        def run(params, x, cond):
            x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x
            return reward_set.total(params, x, cond)

        if len(_JITTED) >= 8:  # a handful of reward sets per process at most
            _JITTED.clear()
        hit = _JITTED[id(reward_set)] = (reward_set, jax.jit(run))
    return hit[1]


def score_images(reward_set, images, captions: Sequence[str], *, batch_size: int = 8, mesh=None,
                 encoders: Mapping[str, Any] | None = None) -> dict:
    """Per-image rewards of `images` ((N, H, W, 3), uint8 or float in [0, 1]) against
    `captions` (N,) -> {name: (N,) float64 numpy, "total": Σ λ_i R_i}. Batches are padded
    to `batch_size` (one compile); with `mesh` they are sharded over it. `encoders`: prompt
    encoders of rewards without their own (see core.t2i_reward.prompt_reward_inputs)."""
    images = np.asarray(images)
    captions = list(captions)
    if images.ndim != 4 or images.shape[0] != len(captions):
        raise ValueError(f"need (N, H, W, 3) images with one caption each; got {images.shape} and {len(captions)} captions")
    uniq = sorted(set(captions))
    index = {c: i for i, c in enumerate(uniq)}
    table = prompt_reward_inputs(reward_set, uniq, encoders)  # each distinct caption encoded once
    rows = np.asarray([index[c] for c in captions])
    if mesh is not None:
        batch_size += (-batch_size) % mesh.size

    run = _jitted_total(reward_set)
    totals, parts = [], {r.name: [] for r in reward_set.rewards}
    for s in range(0, len(images), batch_size):
        idx = np.arange(s, min(s + batch_size, len(images)))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
        x = images[pad]
        cond = {REWARD_TEXT: jax.tree.map(lambda a: np.asarray(a)[rows[pad]], table)}
        if mesh is not None:
            put = lambda a: jax.device_put(a, meshlib.batch_sharding(mesh, np.ndim(a)))
            x, cond = put(x), jax.tree.map(put, cond)
        total, part = jax.device_get(run(reward_set.params, x, cond))
        totals.append(np.asarray(total)[: len(idx)])
        for k, v in part.items():
            parts[k].append(np.asarray(v)[: len(idx)])
    out = {k: np.concatenate(v).astype(np.float64) for k, v in parts.items()}
    out["total"] = np.concatenate(totals).astype(np.float64)
    return out


def score_geneval_folder(folder: str, reward_set, *, batch_size: int = 8, mesh=None,
                         encoders: Mapping[str, Any] | None = None) -> dict:
    """Scores every sample of a GenEval folder against its prompt -> {"mean": {name: x},
    "per_prompt": [{"prompt", name: mean over its samples, ...}], "num_images": N}."""
    items = read_geneval_folder(folder)
    images = [imgs for _, imgs in items if len(imgs)]
    shapes = {im.shape[1:] for im in images}
    captions = [meta["prompt"] for meta, imgs in items for _ in range(len(imgs))]
    if not captions:
        raise ValueError(f"{folder!r} holds no sample images")
    if len(shapes) == 1:
        scores = score_images(reward_set, np.concatenate(images), captions, batch_size=batch_size, mesh=mesh,
                              encoders=encoders)
    else:  # mixed sizes: one call per size
        scores = {}
        for meta, imgs in items:
            if len(imgs):
                s = score_images(reward_set, imgs, [meta["prompt"]] * len(imgs), batch_size=batch_size, mesh=mesh,
                                 encoders=encoders)
                for k, v in s.items():
                    scores.setdefault(k, []).append(v)
        scores = {k: np.concatenate(v) for k, v in scores.items()}
    per_prompt, start = [], 0
    for meta, imgs in items:
        n = len(imgs)
        per_prompt.append({"prompt": meta["prompt"], "num_images": n,
                           **{k: float(np.mean(v[start:start + n])) if n else None for k, v in scores.items()}})
        start += n
    return {"mean": {k: float(np.mean(v)) for k, v in scores.items()}, "per_prompt": per_prompt,
            "num_images": len(captions)}
