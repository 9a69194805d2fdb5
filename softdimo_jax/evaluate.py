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
(or the first --num-classes); text generators (MaskGen, Meissonic: --text-encoder a converted
meissonic_text tower, CFG over --negative-prompt, default Di[M]O's) cycle through --prompt-file's
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

Text-to-image rewards: `--reward NAME=DIR` (repeatable; clip_score, hps_v2, pickscore,
image_reward; DIR a converted checkpoint; image_reward also needs `--bert-vocab vocab.txt`)
scores every sample against its caption (--samples with --prompt-file, cycled as for FID, or a
text-to-image --generator) and writes each reward's mean and std to metrics.json; FID is then
optional (drop --reference / --inception):

    python -m softdimo_jax.evaluate --samples samples.npz --prompt-file captions.txt \
        --reward hps_v2=ckpt/hps_v2 --reward clip_score=ckpt/clip_vit_l14 --out results/

GenEval (github.com/djghosh13/geneval): `--geneval-metadata evaluation_metadata.jsonl
--geneval-out DIR` writes DIR/<prompt index>/{metadata.jsonl, samples/*.png} from a
text-to-image --generator (`--images-per-prompt`, default 4; scored too when --reward is
given); `--score-geneval DIR` scores such a folder with the rewards:

    python -m softdimo_jax.evaluate --generator student --checkpoint WORKDIR/distill/student --tokenizer ckpt/tatitok \
        --text-encoder ckpt/clip_text --geneval-metadata evaluation_metadata.jsonl --geneval-out geneval_samples/
    python -m softdimo_jax.evaluate --score-geneval geneval_samples/ --reward hps_v2=ckpt/hps_v2 --out results/

The Inception checkpoint is pytorch-fid's or torch-fidelity's `.pth` (read without
PyTorch), or an `.npz` saved by `--save-inception-npz` (faster to load next time).
Writes `<out>/metrics.json` and `<out>/samples_grid.png`. Errors are one line (exit 2 for
bad input); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Iterator

import jax
import numpy as np

from softdimo_jax.conversion.inception import load_inception, save_params
from softdimo_jax.data.prompts import read_prompts
from softdimo_jax.data.wordpiece import WordPieceTokenizer
from softdimo_jax.evaluation import export
from softdimo_jax.evaluation import t2i as ev_t2i
from softdimo_jax.evaluation.fid import InceptionFeatureExtractor, evaluate_images
from softdimo_jax.evaluation.reference_stats import (check_reference_source, load_reference, reference_from_source,
                                                     save_reference)
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.errors import BadInput, guarded, one_line, strip_debug
from softdimo_jax.sampling import api


T2I_REWARDS = ("clip_score", "hps_v2", "pickscore", "image_reward")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m softdimo_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--samples", help="ADM-style .npz of generated images (arr_0 uint8 N×H×W×3)")
    src.add_argument("--generator", choices=["teacher", "student"],
                     help="generate the samples instead, from --checkpoint and --tokenizer (any family)")
    src.add_argument("--checkpoint", help="generator checkpoint: converted teacher or <workdir>/<stage>/student")
    src.add_argument("--tokenizer", help="converted image tokenizer of the family (with --generator)")
    src.add_argument("--text-encoder", help="converted text tower (text-to-image generators): clip_text (MaskGen) "
                     "or meissonic_text (Meissonic)")
    src.add_argument("--negative-prompt", help="text teachers: the CFG branch's caption (default: the family's; "
                     "Meissonic: Di[M]O's negative prompt)")
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
    ref.add_argument("--reference", help="reference .npz (ours or an ADM reference batch); needed for FID")
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
    inc.add_argument("--inception", help="FID Inception weights (.pth / .bin / .safetensors / .npz); needed for FID")
    inc.add_argument("--save-inception-npz", help="write the converted Inception params here")
    inc.add_argument("--batch-size", type=int, help="global batch (default 32 per device)")
    inc.add_argument("--num-devices", type=int, help="devices of the mesh (default all)")
    inc.add_argument("--precision", choices=["highest", "default"], default="highest",
                     help="conv precision on TPU/GPU (highest = float32 throughout)")

    rew = p.add_argument_group("text-to-image rewards and GenEval")
    rew.add_argument("--reward", action="append", default=[], metavar="NAME=DIR",
                     help=f"score every sample against its caption with reward NAME ({', '.join(T2I_REWARDS)}) "
                          "from its converted checkpoint DIR (repeatable)")
    rew.add_argument("--bert-vocab", help="bert-base-uncased vocab.txt, ImageReward's prompt tokenizer "
                     "(default $SOFTDIMO_BERT_VOCAB)")
    rew.add_argument("--geneval-metadata", metavar="FILE.jsonl",
                     help="GenEval prompts (evaluation_metadata.jsonl): sample --generator into --geneval-out")
    rew.add_argument("--geneval-out", metavar="DIR", help="GenEval-ready folder to write (must be new or empty)")
    rew.add_argument("--images-per-prompt", type=int, default=4, help="GenEval samples per prompt")
    rew.add_argument("--score-geneval", metavar="DIR", help="score a GenEval folder's samples with the --reward models")

    out = p.add_argument_group("output")
    out.add_argument("--out", help="output folder for metrics.json and the sample grid")
    out.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    out.add_argument("--is-splits", type=int, default=10)
    out.add_argument("--pr-backend", choices=["auto", "host", "device"], default="auto",
                     help="precision/recall distances: host float64, or accelerator float32 (auto: device unless CPU)")
    out.add_argument("--progress-secs", type=float, default=30.0, help="seconds between progress lines")
    return p


def load_generator(args: argparse.Namespace) -> api.Generator:
    """The generator of --checkpoint / --tokenizer (/ --text-encoder), checked."""
    if args.tteo_steps:
        raise BadInput("--tteo-steps needs a reward model, which this CLI does not load yet — drop it; TTEO "
                       "rows come from the digits pipeline (softdimo_jax.sampling.tteo)")
    return api.load_generator(args.checkpoint, args.tokenizer, text_encoder=args.text_encoder,
                              bpe_merges=args.bpe_merges, negative_prompt=args.negative_prompt,
                              flags={"generator": "--checkpoint", "tokenizer": "--tokenizer",
                                     "text_encoder": "--text-encoder"})


def load_rewards(args: argparse.Namespace):
    """(RewardSet, prompt encoders) of the --reward NAME=DIR flags, or (None, None); every
    checkpoint is loaded and checked here, before any sampling or Inception work."""
    if not args.reward:
        return None, None
    ckpts = {}
    for item in args.reward:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise BadInput(f"--reward {item!r} is not NAME=DIR — e.g. --reward hps_v2=ckpt/hps_v2")
        if name not in T2I_REWARDS:
            raise BadInput(f"--reward {name}: unknown reward — choose one of {', '.join(T2I_REWARDS)}")
        if name in ckpts:
            raise BadInput(f"--reward {name} is given twice — pass each reward once")
        if not os.path.isdir(path):
            raise BadInput(f"--reward {name}={path}: no such folder — pass the reward's checkpoint converted with "
                           "python -m softdimo_jax.convert")
        ckpts[name] = path
    try:
        rset = ev_t2i.reward_set_from_checkpoints(ckpts, bpe_merges=args.bpe_merges)
        encoders = {}
        if "image_reward" in ckpts:  # ImageReward reads prompts through BERT WordPiece, not CLIP BPE
            tokenizer = WordPieceTokenizer(args.bert_vocab or None)
            encoders["image_reward"] = lambda captions: tokenizer(list(captions))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise BadInput(f"--reward: {one_line(e)}") from None
    return rset, encoders


def sampler_settings(args: argparse.Namespace, gen: api.Generator) -> tuple[str, str, dict | None]:
    """(kind, mode, settings) of --generator for api.generate."""
    if args.generator == "teacher":
        return "teacher", "hard", api.teacher_settings(gen, num_steps=args.steps, guidance_scale=args.cfg_scale)
    return "student", args.decode, None


def load_generator_for(args: argparse.Namespace) -> tuple[api.Generator, api.Conditions]:
    """The generator of --checkpoint / --tokenizer (/ --text-encoder) and the conditions of
    --num-samples images, checked at once (before any reference statistics)."""
    gen = load_generator(args)
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
    each batch's captions are conds.captions[start : start + len(images)] (see `scored`)."""
    kind, mode, settings = sampler_settings(args, gen)
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


def scored(batches: Iterator[np.ndarray], captions, rset, encoders, scores: dict, *, num_images: int,
           batch_size: int, mesh) -> Iterator[np.ndarray]:
    """Yields the first `num_images` images of `batches` unchanged, scoring each batch against
    its captions (captions[i] for image i) into `scores` ({reward name: [(b,) arrays]}).
    `batches` is read to its end (a generator's --save-samples writer closes there)."""
    start = 0
    for images in batches:
        images = images[: num_images - start]
        if len(images):
            part = ev_t2i.score_images(rset, images, captions[start : start + len(images)], batch_size=batch_size,
                                       mesh=mesh, encoders=encoders)
            for name, v in part.items():
                scores.setdefault(name, []).append(v)
            start += len(images)
            yield images


def reward_summary(scores: dict) -> dict:
    """{reward name (and "total"): {"mean", "std"}} of the per-image scores."""
    out = {}
    for name, parts in scores.items():
        v = np.concatenate(parts) if isinstance(parts, list) else np.asarray(parts)
        out[name] = {"mean": float(np.mean(v)), "std": float(np.std(v))}
    return out


def write_result(args: argparse.Namespace, result: dict, grid=None) -> None:
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        if grid is not None and len(grid):
            export.save_grid(np.asarray(grid), os.path.join(args.out, "samples_grid.png"))


def run_geneval(args: argparse.Namespace, rset, encoders) -> int:
    """--geneval-metadata/--geneval-out: sample a text-to-image --generator into a GenEval
    folder; --score-geneval: score a GenEval folder with the rewards (also after writing one)."""
    folder = args.score_geneval
    mesh = meshlib.make_mesh(args.num_devices)
    if args.geneval_metadata or args.geneval_out:
        if not (args.geneval_metadata and args.geneval_out):
            raise BadInput("GenEval export needs both --geneval-metadata FILE.jsonl and --geneval-out DIR")
        if args.score_geneval or args.samples or not args.generator:
            raise BadInput("--geneval-out samples a generator — pass --generator teacher|student (not --samples "
                           "or --score-geneval)")
        if args.images_per_prompt < 1:
            raise BadInput(f"--images-per-prompt {args.images_per_prompt} must be at least 1")
        if os.path.isdir(args.geneval_out) and os.listdir(args.geneval_out):
            raise BadInput(f"--geneval-out {args.geneval_out} exists and is not empty — choose a new folder")
        try:
            metadata = ev_t2i.read_prompt_metadata(args.geneval_metadata)
        except (FileNotFoundError, ValueError) as e:
            raise BadInput(f"--geneval-metadata: {one_line(e)}") from None
        gen = load_generator(args)
        if gen.spec.conditioning != "text":
            raise BadInput(f"{args.checkpoint} is a class-conditional {gen.family} generator — GenEval needs a "
                           "text-to-image (MaskGen) generator")
        kind, mode, settings = sampler_settings(args, gen)

        def sample_fn(captions, rng):
            seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))  # each prompt its own draw
            images, _ = api.generate(gen, api.make_conditions(gen, captions=list(captions)), kind=kind, mode=mode,
                                     seed=seed, batch_size=args.batch_size or 64, mesh=mesh, settings=settings)
            return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images

        ev_t2i.generate_geneval_folder(sample_fn, metadata, args.geneval_out,
                                       images_per_prompt=args.images_per_prompt, seed=args.seed)
        print(f"GenEval folder: {len(metadata)} prompts x {args.images_per_prompt} images -> {args.geneval_out}",
              file=sys.stderr)
        if rset is None:
            return 0
        folder = args.geneval_out
    if rset is None:
        raise BadInput("--score-geneval scores with the rewards — pass --reward NAME=DIR (e.g. hps_v2=ckpt/hps_v2)")
    try:
        res = ev_t2i.score_geneval_folder(folder, rset, batch_size=args.batch_size or 16, mesh=mesh,
                                          encoders=encoders)
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(f"{folder}: {one_line(e)} — pass a GenEval folder (00000/metadata.jsonl, "
                       "00000/samples/*.png, ...)") from None
    write_result(args, {"geneval_folder": folder, "num_scored": res["num_images"],
                        "rewards": {k: {"mean": v} for k, v in res["mean"].items()}, "per_prompt": res["per_prompt"]})
    return 0


def run(args: argparse.Namespace) -> int:
    rset, encoders = load_rewards(args)  # checked first: a wrong checkpoint fails at once
    if args.geneval_metadata or args.geneval_out or args.score_geneval:
        return run_geneval(args, rset, encoders)
    if args.samples is None and args.generator is None and args.make_reference is None:
        raise BadInput("nothing to evaluate — pass --samples FILE, --generator teacher|student, or --make-reference")
    if args.samples and args.generator:
        raise BadInput("pass either --samples or --generator, not both")
    if args.samples and not os.path.exists(args.samples):
        raise BadInput(f"--samples {args.samples}: no such file — pass an ADM .npz of generated images")

    want_fid = bool(args.reference or args.inception or args.make_reference)
    if not want_fid and rset is None:
        raise BadInput("nothing to measure — pass --reference and --inception for FID, and/or --reward NAME=DIR "
                       "for text-to-image rewards")
    if want_fid and not (args.reference and args.inception):
        raise BadInput("FID needs both --reference and --inception — pass the missing one (or drop both and "
                       "score only --reward)")

    # The generator and its conditions are checked before the (slow) Inception set-up and
    # reference statistics, so a wrong checkpoint fails at once.
    generated, captions = None, None
    if args.samples is None and args.generator:
        gen, conds = load_generator_for(args)
        args.num_samples = len(conds)
        generated = Generated(gen, generate_sample_batches(args, gen, conds))
        captions = conds.captions
    elif args.samples and rset is not None:
        if not args.prompt_file:
            raise BadInput("--reward scores each sample against its caption — pass --prompt-file (the samples' "
                           "captions in order, one per line, cycled)")
        try:
            captions = read_prompts(args.prompt_file)
        except (FileNotFoundError, ValueError) as e:
            raise BadInput(f"--prompt-file: {e}") from None
    if rset is not None and captions is None:
        raise BadInput("--reward needs prompts, and a class-conditional generator has none — pass --samples with "
                       "--prompt-file, or a text-to-image (MaskGen) --generator")
    if not want_fid:
        return run_rewards_only(args, rset, encoders, generated, captions)
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

    n, batches, grid_src = image_source(args, generated, extractor.local_batch_size)
    scores = {}
    if rset is not None:
        batches = scored(batches, cycled(captions, n), rset, encoders, scores, num_images=n,
                         batch_size=args.batch_size or 16, mesh=mesh)
    metrics = evaluate_images(batches, reference, extractor, num_images=n, compute_pr=want_pr,
                              is_splits=args.is_splits, log=log, every_secs=args.progress_secs,
                              pr_backend=args.pr_backend)
    metrics["seconds"] = time.monotonic() - t0
    result = {"samples": args.samples or f"generated:{args.generator}", "reference": args.reference,
              "inception": args.inception, **metrics}
    if scores:
        result["rewards"] = reward_summary(scores)
    if generated is not None:
        result["generator"] = generator_info(args, generated)
    write_result(args, result, grid_src)
    return 0


def cycled(captions, n: int) -> list[str]:
    """n captions, the file's cycled (as the FID path does with --prompt-file)."""
    captions = list(captions)
    return [captions[i % len(captions)] for i in range(n)]


def generator_info(args: argparse.Namespace, generated) -> dict:
    gen = generated.gen
    return {"checkpoint": args.checkpoint, "family": gen.family, "stage": gen.stage, "kind": args.generator,
            "decode": "hard" if args.generator == "teacher" else args.decode}


@dataclasses.dataclass
class Generated:
    """The generator's batches (generate_sample_batches) with the generator they come from."""

    gen: api.Generator
    batches: Iterator[tuple[np.ndarray, np.ndarray]]


def image_source(args: argparse.Namespace, generated: Generated | None,
                 batch_size: int) -> tuple[int, Iterator[np.ndarray], list]:
    """(number of images, uint8 batches, up to 64 images for the grid) of --samples or of the
    generator (writing --save-samples on the way)."""
    if args.samples:
        shape, dtype = export.npz_array_shape(args.samples)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise BadInput(f"{args.samples}: arr_0 must be uint8 (N, H, W, 3), got {dtype} {shape} — pass an ADM "
                           "sample file")
        n = shape[0] if args.num_samples is None else min(args.num_samples, shape[0])
        batches = export.iter_npz_images(args.samples, batch_size=batch_size)
        return n, batches, list(next(export.iter_npz_images(args.samples, batch_size=64)))
    n, gen = args.num_samples, generated.gen
    grid_src = []

    def images_only():
        writer = None
        for images, labels in generated.batches:
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

    return n, images_only(), grid_src


def run_rewards_only(args: argparse.Namespace, rset, encoders, generated: Generated | None, captions) -> int:
    """--reward without FID: score the samples (or the generator's) against their captions."""
    t0 = time.monotonic()
    batch = args.batch_size or 16
    n, batches, grid_src = image_source(args, generated, max(batch, 64))
    scores = {}
    for _ in scored(batches, cycled(captions, n), rset, encoders, scores, num_images=n, batch_size=batch,
                    mesh=meshlib.make_mesh(args.num_devices)):
        pass
    result = {"samples": args.samples or f"generated:{args.generator}", "num_scored": n,
              "prompt_file": args.prompt_file, "rewards": reward_summary(scores),
              "seconds": time.monotonic() - t0}
    if generated is not None:
        result["generator"] = generator_info(args, generated)
    write_result(args, result, grid_src)
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
