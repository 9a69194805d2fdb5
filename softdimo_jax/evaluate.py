"""FID / IS / precision / recall from the command line.

Evaluate an ADM-style sample file (`arr_0` uint8 N×H×W×3) against reference statistics:

    python -m softdimo_jax.evaluate --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --out results/

Or generate the samples from a converted generator of any family (the converted teacher,
or a stage's exported student <workdir>/<stage>/student) and its image tokenizer:

    python -m softdimo_jax.evaluate --generator student --checkpoint WORKDIR/gan/student \\
        --tokenizer ckpt/tok14 --decode soft --num-samples 50000 --reference ref.npz --inception ...
    python -m softdimo_jax.evaluate --generator student --checkpoint WORKDIR/distill/student \\
        --tokenizer ckpt/tatitok --text-encoder ckpt/clip_text --bpe-merges bpe_simple_vocab_16e6.txt.gz \\
        --prompt-file captions.txt --num-samples 30000 --reference coco_ref.npz --inception ...

Class generators (MaskBit, MaskGIT) sample class-balanced labels over the model's classes
(or the first --num-classes); text generators (MaskGen) cycle through --prompt-file's
captions. `--generator teacher` runs the family's multi-step sampler (`--steps`,
`--cfg-scale`), `student` the one-step generator (`--decode hard|soft`), all through
`softdimo_jax.sampling.api`. The checkpoints are checked before any reference statistics
are computed.

Reference statistics: `--reference` is our `.npz` (mu, sigma, features) or an ADM reference
batch (mu, sigma, arr_0); an `.npz` holding only images (`arr_0`) also works (its statistics
are computed on load). `--make-reference SOURCE` computes them first and saves them to
--reference, from a folder of images, an ADM-style `.npz` of images, or a prepared tfds
dataset (array_record; needs `pip install tensorflow-datasets array-record`, and a prepared
copy in --data-dir: nothing is downloaded):

    python -m softdimo_jax.evaluate --make-reference imagenet2012 --split train --data-dir ~/tensorflow_datasets \\
        --num-reference 50000 --reference ref_imagenet256.npz --inception pt_inception-2015-12-05-6726825d.pth
    python -m softdimo_jax.evaluate --make-reference path/to/real_images/ --reference ref.npz --inception ...

The Inception checkpoint is pytorch-fid's or torch-fidelity's `.pth` (read without
PyTorch), or an `.npz` saved by `--save-inception-npz` (faster to load next time).
Writes `<out>/metrics.json` and `<out>/samples_grid.png`. Errors are one line (exit 2 for
bad input); `--debug` shows the traceback.
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
from softdimo_jax.data.prompts import read_prompts
from softdimo_jax.evaluation import export
from softdimo_jax.evaluation.fid import InceptionFeatureExtractor, evaluate_images
from softdimo_jax.evaluation.reference_stats import (check_reference_source, load_reference, reference_from_source,
                                                     save_reference)
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.errors import BadInput, guarded, strip_debug
from softdimo_jax.sampling import api


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m softdimo_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--samples", help="ADM-style .npz of generated images (arr_0 uint8 N×H×W×3)")
    src.add_argument("--generator", choices=["teacher", "student"],
                     help="generate the samples instead, from --checkpoint and --tokenizer (any family)")
    src.add_argument("--checkpoint", help="generator checkpoint: converted teacher or <workdir>/<stage>/student")
    src.add_argument("--tokenizer", help="converted image tokenizer of the family (with --generator)")
    src.add_argument("--text-encoder", help="converted clip_text tower (text-to-image generators)")
    src.add_argument("--bpe-merges", help="CLIP BPE merges file (default $SOFTDIMO_CLIP_BPE, else open_clip's)")
    src.add_argument("--prompt-file", help="captions, one per line, cycled over the samples (text-to-image)")
    src.add_argument("--steps", type=int, help="teacher sampling steps (student: 1)")
    src.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale")
    src.add_argument("--decode", choices=["hard", "soft"], default="hard", help="student decode mode")
    src.add_argument("--tteo-steps", type=int, default=0, help="test-time embedding optimisation steps")
    src.add_argument("--num-classes", type=int, help="class-balanced labels over the first N classes "
                     "(default: all of the model's)")
    src.add_argument("--seed", type=int, default=0)
    src.add_argument("--save-samples", help="also write the generated samples to this ADM .npz")
    src.add_argument("--num-samples", type=int, help="evaluate only the first N samples (default: all / 50000)")

    ref = p.add_argument_group("reference statistics")
    ref.add_argument("--reference", required=True, help="reference .npz (ours or an ADM reference batch)")
    ref.add_argument("--make-reference", metavar="SOURCE",
                     help="compute reference statistics from a folder of images, an ADM .npz of images or a "
                          "prepared tfds dataset name, and save them to --reference")
    ref.add_argument("--split", default="train")
    ref.add_argument("--data-dir", help="tfds data_dir holding the prepared (array_record) dataset")
    ref.add_argument("--image-size", type=int, default=256,
                     help="centre-crop size of reference images (tfds / folder)")
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


def load_generator_for(args: argparse.Namespace) -> tuple[api.Generator, api.Conditions]:
    """The generator of --checkpoint / --tokenizer (/ --text-encoder) and the conditions of
    --num-samples images, checked at once (before any reference statistics)."""
    if args.tteo_steps:
        raise BadInput("--tteo-steps needs a reward model, which this CLI does not load yet — drop it; TTEO "
                       "rows come from the digits pipeline (softdimo_jax.sampling.tteo)")
    gen = api.load_generator(args.checkpoint, args.tokenizer, text_encoder=args.text_encoder,
                             bpe_merges=args.bpe_merges,
                             flags={"generator": "--checkpoint", "tokenizer": "--tokenizer",
                                    "text_encoder": "--text-encoder"})
    n = args.num_samples or 50_000
    if gen.spec.conditioning == "text":
        if not args.prompt_file:
            raise BadInput(f"{args.checkpoint} is a text-to-image {gen.family} generator — pass --prompt-file "
                           "(captions, one per line, cycled over the samples)")
        try:
            captions = read_prompts(args.prompt_file)
        except (FileNotFoundError, ValueError) as e:
            raise BadInput(f"--prompt-file: {e}") from None
        return gen, api.make_conditions(gen, captions=[captions[i % len(captions)] for i in range(n)])
    if args.prompt_file:
        raise BadInput(f"{gen.family} is class-conditional — drop --prompt-file (labels are class-balanced)")
    num_classes = gen.spec.num_classes(gen.model)
    if args.num_classes is not None and not 1 <= args.num_classes <= num_classes:
        raise BadInput(f"--num-classes {args.num_classes} is outside the generator's 1..{num_classes} classes — "
                       "pass at most the model's class count")
    labels = export.class_balanced_labels(n, args.num_classes or num_classes)
    return gen, api.make_conditions(gen, labels=labels)


def generate_sample_batches(args: argparse.Namespace, gen: api.Generator,
                            conds: api.Conditions) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (images uint8 (b, H, W, 3), labels (b,) or -1 for captions) for every row of
    `conds`, from the teacher (`--steps`, `--cfg-scale`) or the one-step student
    (`--decode hard|soft`) through `softdimo_jax.sampling.api.generate`.

    Reward scoring against the prompts (CLIP / HPS / PickScore) belongs next to this loop:
    each batch's captions are conds.captions[start : start + len(images)]."""
    if args.generator == "teacher":
        kind, mode = "teacher", "hard"
        settings = api.teacher_settings(gen, num_steps=args.steps, guidance_scale=args.cfg_scale)
    else:
        kind, mode, settings = "student", args.decode, None
    mesh = meshlib.make_mesh(args.num_devices)
    batch = args.batch_size or 64
    chunk = max(batch, 1) * 4  # several sampler batches per yield
    n = len(conds)
    for start in range(0, n, chunk):
        part = api.Conditions(
            labels=None if conds.labels is None else conds.labels[start : start + chunk],
            captions=None if conds.captions is None else conds.captions[start : start + chunk])
        images, _ = api.generate(gen, part, kind=kind, mode=mode, seed=args.seed + start, batch_size=batch,
                                 mesh=mesh, settings=settings)
        images = export.to_uint8(images)
        if images.shape[-1] == 1:  # grey tokenizers: Inception reads RGB
            images = np.repeat(images, 3, axis=-1)
        labels = part.labels if part.labels is not None else np.full(len(images), -1, np.int32)
        yield images, labels


def run(args: argparse.Namespace) -> int:
    if args.samples is None and args.generator is None and args.make_reference is None:
        raise BadInput("nothing to evaluate — pass --samples FILE, --generator teacher|student, or --make-reference")
    if args.samples and args.generator:
        raise BadInput("pass either --samples or --generator, not both")
    if args.samples and not os.path.exists(args.samples):
        raise BadInput(f"--samples {args.samples}: no such file — pass an ADM .npz of generated images")

    # The generator and its conditions are checked before the (slow) Inception set-up and
    # reference statistics, so a wrong checkpoint fails at once.
    generated = None
    if args.samples is None and args.generator:
        gen, conds = load_generator_for(args)
        args.num_samples = len(conds)
        generated = generate_sample_batches(args, gen, conds)
    if not os.path.exists(args.inception):
        raise BadInput(f"--inception {args.inception}: no such file — pass the FID Inception weights "
                       "(pt_inception-2015-12-05-6726825d.pth, or an .npz from --save-inception-npz)")
    if args.make_reference:
        check_reference_source(args.make_reference, args.split, args.data_dir)
    elif not os.path.exists(args.reference):
        raise BadInput(f"--reference {args.reference}: no such file — pass reference statistics (.npz), or build "
                       "them with --make-reference SOURCE")

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
        ref = reference_from_source(args.make_reference, extractor, split=args.split, data_dir=args.data_dir,
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
            raise BadInput(f"{args.samples}: arr_0 must be uint8 (N, H, W, 3), got {dtype} {shape} — pass an ADM "
                           "sample file")
        n = shape[0] if args.num_samples is None else min(args.num_samples, shape[0])
        batches = export.iter_npz_images(args.samples, batch_size=extractor.local_batch_size)
        grid_src = next(export.iter_npz_images(args.samples, batch_size=64))
    else:
        n = args.num_samples
        writer = None
        grid_src = []

        def images_only():
            nonlocal writer
            for images, labels in generated:
                if args.save_samples:
                    if writer is None:  # the generator's image size is known from its first batch
                        writer = export.AdmNpzWriter(args.save_samples, n, images.shape[1:3],
                                                     with_labels=gen.spec.conditioning == "class")
                    writer.add(images, labels if gen.spec.conditioning == "class" else None)
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
    if generated is not None:
        result["generator"] = {"checkpoint": args.checkpoint, "family": gen.family, "stage": gen.stage,
                               "kind": args.generator, "decode": "hard" if args.generator == "teacher" else args.decode}
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        if len(grid_src):
            export.save_grid(np.asarray(grid_src), os.path.join(args.out, "samples_grid.png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI: errors of ours are one line on stderr (exit 2 for bad input); --debug shows
    the traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    args = build_parser().parse_args(strip_debug(argv))
    return guarded("evaluate", lambda: run(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
