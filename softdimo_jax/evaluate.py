"""FID / IS / precision / recall from the command line.

Evaluate an ADM-style sample file (`arr_0` uint8 N×H×W×3) against reference statistics:

    python -m softdimo_jax.evaluate --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --out results/

Compute reference statistics from a prepared tfds dataset (array_record) first:

    python -m softdimo_jax.evaluate --make-reference imagenet2012 --split train --data-dir ~/tensorflow_datasets \\
        --num-reference 50000 --reference ref_imagenet256.npz --inception pt_inception-2015-12-05-6726825d.pth

`--reference` is our `.npz` (mu, sigma, features) or an ADM reference batch (mu, sigma,
arr_0). The Inception checkpoint is pytorch-fid's or torch-fidelity's `.pth` (read without
PyTorch), or an `.npz` saved by `--save-inception-npz` (faster to load next time).
Writes `<out>/metrics.json` and `<out>/samples_grid.png`.

`--generator teacher|student` generates the samples instead, from a converted MaskBit
teacher (N steps, CFG) or a one-step student (hard / soft decode) and its tokenizer,
through `softdimo_jax.sample.generate_images` (`generate_sample_batches` below).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Iterator

import numpy as np

from softdimo_jax.conversion.inception import load_inception, save_params
from softdimo_jax.evaluation import export
from softdimo_jax.evaluation.fid import InceptionFeatureExtractor, evaluate_images
from softdimo_jax.evaluation.reference_stats import load_reference, reference_from_tfds, save_reference
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.converted import load_converted
from softdimo_jax.sample import generate_images


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m softdimo_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--samples", help="ADM-style .npz of generated images (arr_0 uint8 N×H×W×3)")
    src.add_argument("--generator", choices=["teacher", "student"],
                     help="generate the samples instead, from --checkpoint and --tokenizer")
    src.add_argument("--checkpoint", help="converted generator checkpoint (with --generator)")
    src.add_argument("--tokenizer", help="converted tokenizer checkpoint (with --generator)")
    src.add_argument("--steps", type=int, help="teacher sampling steps (student: 1)")
    src.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale")
    src.add_argument("--decode", choices=["hard", "soft"], default="hard", help="student decode mode")
    src.add_argument("--tteo-steps", type=int, default=0, help="test-time embedding optimisation steps")
    src.add_argument("--num-classes", type=int, default=1000, help="classes for class-balanced labels")
    src.add_argument("--seed", type=int, default=0)
    src.add_argument("--save-samples", help="also write the generated samples to this ADM .npz")
    src.add_argument("--num-samples", type=int, help="evaluate only the first N samples (default: all / 50000)")

    ref = p.add_argument_group("reference statistics")
    ref.add_argument("--reference", required=True, help="reference .npz (ours or an ADM reference batch)")
    ref.add_argument("--make-reference", metavar="TFDS_NAME",
                     help="compute reference statistics from this tfds dataset and save them to --reference")
    ref.add_argument("--split", default="train")
    ref.add_argument("--data-dir", help="tfds data_dir holding the prepared (array_record) dataset")
    ref.add_argument("--image-size", type=int, default=256, help="centre-crop size of reference images")
    ref.add_argument("--num-reference", type=int, default=50_000, help="reference images (0 = whole split)")
    ref.add_argument("--reference-features", type=int, default=50_000,
                     help="pool features kept for precision/recall (0 = none)")

    inc = p.add_argument_group("Inception")
    inc.add_argument("--inception", required=True, help="FID Inception weights (.pth / .bin / .safetensors / .npz)")
    inc.add_argument("--save-inception-npz", help="write the converted Inception params here")
    inc.add_argument("--batch-size", type=int, help="global batch (default 32 per device)")
    inc.add_argument("--num-devices", type=int, help="devices of the mesh (default all)")
    inc.add_argument("--precision", choices=["highest", "default"], default="highest",
                     help="conv precision on TPU/GPU (highest = float32 throughout)")

    out = p.add_argument_group("output")
    out.add_argument("--out", help="output folder for metrics.json and the sample grid")
    out.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    out.add_argument("--is-splits", type=int, default=10)
    out.add_argument("--pr-backend", choices=["auto", "host", "device"], default="auto",
                     help="precision/recall distances: host float64, or accelerator float32 (auto: device unless CPU)")
    out.add_argument("--progress-secs", type=float, default=30.0, help="seconds between progress lines")
    return p


def generate_sample_batches(args: argparse.Namespace) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (images uint8 (b, H, W, 3), labels (b,)) for `args.num_samples` class-balanced
    labels, from a converted MaskBit teacher (`--steps`, `--cfg-scale`) or a one-step student
    (`--decode hard|soft`), decoded by the converted tokenizer (`--tokenizer`). Generation runs
    through `softdimo_jax.sample.generate_images` (jitted, batch sharded over the mesh)."""
    if not args.checkpoint or not args.tokenizer:
        raise SystemExit("error: --generator needs --checkpoint (converted generator) and --tokenizer "
                         "(converted tokenizer); see `python -m softdimo_jax.convert`")
    if args.tteo_steps:
        raise SystemExit("error: --tteo-steps needs a reward model, which this CLI does not load; run "
                         "TTEO through softdimo_jax.sampling.tteo (the digits main job reports tteo rows)")
    # Loaded eagerly (not inside the generator below) so a bad checkpoint fails at once.
    gen_model, gen_params = load_converted(args.checkpoint)
    tok_model, tok_params = load_converted(args.tokenizer)
    return _generated_batches(args, gen_model, gen_params, tok_model, tok_params)


def _generated_batches(args, gen_model, gen_params, tok_model, tok_params):
    n = args.num_samples or 50_000
    labels = export.class_balanced_labels(n, args.num_classes)
    kwargs = {}
    if args.generator == "teacher":
        if args.steps:
            kwargs["num_steps"] = args.steps
        if args.cfg_scale is not None:
            kwargs["guidance_scale"] = args.cfg_scale
    else:
        kwargs["student_mode"] = args.decode
    chunk = max(args.batch_size or 64, 1) * 4  # several sampler batches per yield
    for start in range(0, n, chunk):
        lab = labels[start : start + chunk]
        images, _ = generate_images(gen_model, gen_params, tok_model, tok_params, lab,
                                    mode=args.generator, seed=args.seed + start,
                                    num_devices=args.num_devices, batch_size=args.batch_size or 64,
                                    **kwargs)
        images = export.to_uint8(images)
        if images.shape[-1] == 1:  # grey tokenizers: Inception reads RGB
            images = np.repeat(images, 3, axis=-1)
        yield images, lab


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples is None and args.generator is None and args.make_reference is None:
        print("error: pass --samples FILE (or --generator, or --make-reference)", file=sys.stderr)
        return 2

    # Load the generator before the (slow) Inception set-up, so a bad checkpoint fails fast.
    generated = generate_sample_batches(args) if args.samples is None and args.generator else None

    t0 = time.monotonic()
    params = load_inception(args.inception)
    if args.save_inception_npz:
        save_params(params, args.save_inception_npz)
    mesh = meshlib.make_mesh(args.num_devices)
    extractor = InceptionFeatureExtractor(params, mesh=mesh, batch_size=args.batch_size,
                                          precision=None if args.precision == "default" else "highest")
    log = lambda m: print(m, file=sys.stderr, flush=True)
    log(f"inception ready on {mesh.size} device(s), batch {extractor.batch_size} ({time.monotonic() - t0:.1f}s)")

    if args.make_reference:
        ref = reference_from_tfds(args.make_reference, extractor, split=args.split, data_dir=args.data_dir,
                                  image_size=args.image_size, num_samples=args.num_reference or None,
                                  seed=args.seed, max_features=args.reference_features or None, log=log)
        save_reference(args.reference, ref)
        log(f"reference statistics of {ref.num_samples} images -> {args.reference}")
        if args.samples is None and args.generator is None:
            return 0

    want_pr = not args.no_pr
    reference = load_reference(args.reference, need_features=False, extractor=extractor, log=log)
    if want_pr and reference.features is None:
        try:
            reference = load_reference(args.reference, need_features=True, extractor=extractor, log=log)
        except ValueError as e:
            log(f"precision/recall skipped: {e}")

    if args.samples:
        shape, dtype = export.npz_array_shape(args.samples)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise SystemExit(f"{args.samples}: arr_0 must be uint8 (N, H, W, 3), got {dtype} {shape}")
        n = shape[0] if args.num_samples is None else min(args.num_samples, shape[0])
        batches = export.iter_npz_images(args.samples, batch_size=extractor.local_batch_size)
        grid_src = next(export.iter_npz_images(args.samples, batch_size=64))
    else:
        n = args.num_samples or 50_000
        args.num_samples = n
        writer = export.AdmNpzWriter(args.save_samples, n, args.image_size) if args.save_samples else None
        grid_src = []

        def images_only():
            for images, labels in generated:
                if writer is not None:
                    writer.add(images, labels)
                if len(grid_src) < 64:
                    grid_src.extend(export.to_uint8(images)[: 64 - len(grid_src)])
                yield images
            if writer is not None:
                writer.close()

        batches = images_only()

    metrics = evaluate_images(batches, reference, extractor, num_images=n, compute_pr=want_pr,
                              is_splits=args.is_splits, log=log, every_secs=args.progress_secs,
                              pr_backend=args.pr_backend)
    metrics["seconds"] = time.monotonic() - t0
    result = {"samples": args.samples or f"generated:{args.generator}", "reference": args.reference,
              "inception": args.inception, **metrics}
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        if len(grid_src):
            export.save_grid(np.asarray(grid_src), os.path.join(args.out, "samples_grid.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
