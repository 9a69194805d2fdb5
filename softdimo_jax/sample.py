"""Sample a grid of images from converted checkpoints and write a PNG.

  python -m softdimo_jax.sample --mode teacher \\
      --generator ckpt/maskbit_generator_14bit --tokenizer ckpt/maskbit_tokenizer_14bit \\
      --labels 1,7,282,604 --num_steps 64 --out grid.png

Checkpoints are the ones `python -m softdimo_jax.convert` writes (loaded through
`softdimo_jax.runtime.converted.load_converted`). `--mode teacher` runs MaskBit's multi-step parallel
decoding (defaults = MaskBit's released ImageNet settings); `--mode student` samples the
one-step Di[M]O generator in one forward (`--student_mode hard` tokens, or `soft`: the
expected bits decoded directly), see SAMPLERS below. The batch is sharded over all visible
devices (or --num_devices); it is padded to a multiple of the device count and the padding
dropped, and each chunk of --batch_size samples gets rng fold_in(seed, chunk), so the images
depend on the seed, the label list and --batch_size.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.models import lfq
from softdimo_jax.sampling import maskbit_sampler
from softdimo_jax.runtime.artifacts import save_image_grid
from softdimo_jax.runtime.converted import load_converted
from softdimo_jax.runtime.distributed import run_absl
from softdimo_jax.sampling import student

FLAGS = flags.FLAGS
D = maskbit_sampler.IMAGENET_DEFAULTS

_FLAGS_DEFINED = False


def define_flags() -> None:
    """Defines this CLI's flags (only when it runs, so importing the module adds no globals
    that could collide with other CLIs in the same process). Idempotent."""
    global _FLAGS_DEFINED
    if _FLAGS_DEFINED:
        return
    _FLAGS_DEFINED = True
    flags.DEFINE_enum("mode", "teacher", ["teacher", "student"], "teacher: multi-step MaskBit decoding; student: one-step generator.")
    flags.DEFINE_string("generator", None, "Converted generator checkpoint: the teacher (teacher mode) or the "
                        "distilled one-step generator saved in the same format (student mode).")
    flags.DEFINE_string("tokenizer", None, "Converted tokenizer (ConvVQModel) checkpoint.")
    flags.DEFINE_string("labels", None, "Comma-separated class labels, one image each, e.g. 1,7,282.")
    flags.DEFINE_string("out", "grid.png", "Output PNG path.")
    flags.DEFINE_string("save_tokens", None, "Optional .npy path for the sampled (B, h, w) token ids.")
    flags.DEFINE_integer("seed", 0, "PRNG seed.")
    flags.DEFINE_integer("nrow", None, "Images per grid row (default ceil(sqrt(N))).")
    flags.DEFINE_integer("num_devices", None, "Devices to shard the batch over (default: all).")
    flags.DEFINE_integer("batch_size", 64, "Samples per jitted call (rounded up to a multiple of the device count).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the generator (params stay float32).")
    flags.DEFINE_integer("num_steps", D["num_steps"], "Teacher decoding steps.")
    flags.DEFINE_float("guidance_scale", D["guidance_scale"], "CFG scale s in c + s*a(i)*(c - u); 0 disables CFG.")
    flags.DEFINE_enum("guidance_annealing", D["guidance_annealing"], list(maskbit_sampler.GUIDANCE_ANNEALINGS),
                      "a(i): cosine = MaskBit's power-cos annealing.")
    flags.DEFINE_float("scale_pow", D["scale_pow"], "Power of the power-cos guidance annealing.")
    flags.DEFINE_float("randomize_temperature", D["randomize_temperature"], "Gumbel confidence noise scale (times 1 - progress).")
    flags.DEFINE_float("softmax_temperature", D["softmax_temperature"], "Sampling temperature.")
    flags.DEFINE_bool("use_sampling_annealing", D["use_sampling_annealing"], "Temperature 0.5 + 0.8*(1 - progress) instead.")
    flags.DEFINE_enum("mask_schedule", D["mask_schedule"], list(maskbit_sampler.MASK_SCHEDULES), "Mask schedule.")
    # Student (one-step) settings; the defaults are those of the distillation config.
    flags.DEFINE_enum("student_mode", "hard", ["hard", "soft"], "hard: sampled tokens; soft: decode the expected bits.")
    flags.DEFINE_float("student_temperature", 1.0, "Hard one-step sampling temperature (0 = argmax).")
    flags.DEFINE_float("soft_tau", 1.0, "Softmax temperature of the soft decode.")
    flags.DEFINE_float("r_init", 0.6, "MASK fraction of the student's initial state.")
    flags.DEFINE_float("sigma_init", 0.1, "Noise scale of the student's initial embeddings.")


def load_checkpoint(path: str, **runtime_overrides):
    """(model, params) from a checkpoint written by `python -m softdimo_jax.convert`."""
    return load_converted(path, **runtime_overrides)


def parse_labels(text: str | None) -> np.ndarray:
    if not text:
        raise app.UsageError("--labels is required, e.g. --labels 1,7,282")
    try:
        labels = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise app.UsageError(f"--labels must be comma-separated integers, got {text!r}") from None
    if not labels:
        raise app.UsageError("--labels is empty")
    return np.asarray(labels, np.int32)


def teacher_sampler(model, mesh, sampler_kwargs: dict) -> Callable:
    """fn(params, rng, labels) -> {"tokens": (B, L, S) sub-token ids}."""
    sample = maskbit_sampler.make_maskbit_teacher_sampler(model, mesh=mesh, **sampler_kwargs)
    return lambda params, rng, labels: {"tokens": sample(params, rng, labels)}


def student_sampler(model, mesh, sampler_kwargs: dict) -> Callable:
    """The one-step Di[M]O / Soft-Di[M]O generator (softdimo_jax.sampling.student).

    fn(params, rng, labels) -> {"tokens": (B, L, S)} for the hard one-step sample, or
    {"bits": (B, L, num_bits)} expected ±1 bits for the soft decode.
    """
    return student.sample_cli_hook(model, mesh, sampler_kwargs)


SAMPLERS: dict[str, Callable[[Any, Any, dict], Callable]] = {"teacher": teacher_sampler, "student": student_sampler}


def _check_models(gen_model, tok_model, labels):
    for field in ("num_tokens", "num_bits", "splits"):
        if not hasattr(gen_model, field):
            raise ValueError(f"--generator holds a {type(gen_model).__name__}, not an LFQBert-style generator")
    if not hasattr(tok_model, "decode_tokens"):
        raise ValueError(f"--tokenizer holds a {type(tok_model).__name__}, which has no decode_tokens")
    if gen_model.num_bits != tok_model.num_bits:
        raise ValueError(
            f"generator uses {gen_model.num_bits}-bit tokens but the tokenizer {tok_model.num_bits}-bit ones; "
            "pass the matching pair of checkpoints"
        )
    side = math.isqrt(gen_model.num_tokens)
    if side * side != gen_model.num_tokens:
        raise ValueError(f"generator has {gen_model.num_tokens} tokens, not a square grid")
    num_classes = getattr(gen_model, "num_classes", None)
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got {labels.tolist()}")
    return side


def generate_images(
    gen_model,
    gen_params,
    tok_model,
    tok_params,
    labels,
    *,
    mode: str = "teacher",
    seed: int = 0,
    num_devices: int | None = None,
    batch_size: int = 64,
    **sampler_kwargs,
):
    """Samples one image per label. Returns (images (N, H, W, C) in [0, 1], token ids (N, h, w))."""
    labels = np.asarray(labels, np.int32).reshape(-1)
    side = _check_models(gen_model, tok_model, labels)
    if mode not in SAMPLERS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(SAMPLERS)}")
    mesh = meshlib.make_mesh(num_devices)
    sample = SAMPLERS[mode](gen_model, mesh, sampler_kwargs)
    chunk = max(mesh.size, -(-max(batch_size, 1) // mesh.size) * mesh.size)
    nbits, splits = gen_model.num_bits, gen_model.splits

    @jax.jit
    def decode(params, out):
        if "bits" in out:  # soft decode of expected bits
            bits = out["bits"].reshape(-1, side, side, nbits)
            images = tok_model.apply({"params": params}, bits, method="decode_bits")
            ids = lfq.bits_to_indices(bits)
        else:
            ids = lfq.merge_splits(out["tokens"], nbits, splits).reshape(-1, side, side)
            images = tok_model.apply({"params": params}, ids, method="decode_tokens")
        return jnp.clip(images, 0.0, 1.0), ids

    rng = jax.random.PRNGKey(seed)
    images, ids = [], []
    for c, start in enumerate(range(0, len(labels), chunk)):
        part = labels[start : start + chunk]
        padded = np.concatenate([part, np.zeros(-len(part) % mesh.size, np.int32)])
        out = sample(gen_params, jax.random.fold_in(rng, c), padded)
        img, tok = decode(tok_params, out)
        images.append(np.asarray(img)[: len(part)])
        ids.append(np.asarray(tok)[: len(part)])
    return np.concatenate(images), np.concatenate(ids)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    labels = parse_labels(FLAGS.labels)
    for name in ("generator", "tokenizer"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required (a checkpoint written by softdimo_jax.convert)")
    gen_model, gen_params = load_checkpoint(FLAGS.generator, dtype=FLAGS.dtype)
    tok_model, tok_params = load_checkpoint(FLAGS.tokenizer)
    sampler_kwargs = dict(
        num_steps=FLAGS.num_steps,
        guidance_scale=FLAGS.guidance_scale,
        guidance_annealing=FLAGS.guidance_annealing,
        scale_pow=FLAGS.scale_pow,
        randomize_temperature=FLAGS.randomize_temperature,
        softmax_temperature=FLAGS.softmax_temperature,
        use_sampling_annealing=FLAGS.use_sampling_annealing,
        mask_schedule=FLAGS.mask_schedule,
    )
    if FLAGS.mode == "student":
        sampler_kwargs = dict(
            student_mode=FLAGS.student_mode,
            student_temperature=FLAGS.student_temperature,
            soft_tau=FLAGS.soft_tau,
            r_init=FLAGS.r_init,
            sigma_init=FLAGS.sigma_init,
        )
    images, ids = generate_images(
        gen_model, gen_params, tok_model, tok_params, labels,
        mode=FLAGS.mode, seed=FLAGS.seed, num_devices=FLAGS.num_devices, batch_size=FLAGS.batch_size,
        **sampler_kwargs,
    )
    path = save_image_grid(images, FLAGS.out, nrow=FLAGS.nrow)
    if FLAGS.save_tokens:
        np.save(FLAGS.save_tokens, ids)
    print(f"wrote {len(images)} images ({FLAGS.mode}, {images.shape[1]}x{images.shape[2]}) to {path}")


if __name__ == "__main__":
    define_flags()
    run_absl(main)
