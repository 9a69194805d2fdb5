"""Sample images from converted checkpoints of any generator family and write a PNG grid.

Class-conditional (MaskBit, MaskGIT): class labels.

  python -m softdimo_jax.sample --mode teacher \\
      --generator ckpt/maskbit_generator_14bit --tokenizer ckpt/maskbit_tokenizer_14bit \\
      --labels 1,7,282,604 --num_steps 64 --out grid.png
  python -m softdimo_jax.sample --mode student --student_mode soft \\
      --generator WORKDIR/distill/student --tokenizer ckpt/maskbit_tokenizer_14bit --labels 1,7,282,604

Text-to-image (MaskGen): prompts (`--prompt`, repeatable, and/or `--prompt_file`, one caption
per line), the converted OpenCLIP text tower (`--text_encoder`) and the CLIP BPE merges file
(`--bpe_merges`, else $SOFTDIMO_CLIP_BPE, else open_clip's):

  python -m softdimo_jax.sample --mode student --generator WORKDIR/distill/student \\
      --tokenizer ckpt/tatitok --text_encoder ckpt/clip_text --bpe_merges bpe_simple_vocab_16e6.txt.gz \\
      --prompt "a red cube on a table" --prompt "two dogs on a beach" --out t2i.png

Meissonic: the converted Meissonic text tower (`--text_encoder`, `convert --model
meissonic_text`; prompts padded with the end token as its pipeline does), the converted VQ
model (`--tokenizer`), CFG over Di[M]O's negative prompt (`--negative_prompt` replaces it) and
the token grid (`--token_grid 64`: 1024 px; an exported student's is stored with it):

  python -m softdimo_jax.sample --mode teacher --generator ckpt/meissonic --tokenizer ckpt/meissonic_vq \
      --text_encoder ckpt/meissonic_text --prompt "a red cube on a table" --num_steps 48 --out meissonic.png
  python -m softdimo_jax.sample --mode student --generator WORKDIR/distill/student --tokenizer ckpt/meissonic_vq \
      --text_encoder ckpt/meissonic_text --prompt "a red cube on a table" --out dimo.png

The family comes from the generator's model.json (`python -m softdimo_jax.convert` for a
teacher, `<workdir>/<stage>/student` exported by every distillation / refinement stage) and
picks the sampler through `softdimo_jax.sampling.api`. `--mode teacher` runs the family's
multi-step sampler (its published defaults; `--num_steps`, `--guidance_scale`, ... override);
`--mode student` samples the one-step generator in one forward (`--student_mode hard`:
sampled tokens; `soft`: the decoder reads the expected codes), with the settings its stage
stored in model.json unless given here. The grid shows the caption or class under each image;
`--out_dir` also writes one PNG per image. The batch is sharded over all visible devices (or
--num_devices), padded to a multiple of the device count, and the chunk at offset i uses rng
fold_in(seed, i), so the images depend on the seed, the conditions and --batch_size.
Errors are one line (exit 2 for bad input); `--debug` shows the traceback.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from softdimo_jax.data.prompts import read_prompts
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.artifacts import save_image_grid
from softdimo_jax.runtime.distributed import run_absl
from softdimo_jax.runtime.errors import BadInput, define_debug_flag, guarded
from softdimo_jax.sampling import api

FLAGS = flags.FLAGS

_FLAGS_DEFINED = False
# Teacher settings the CLI passes by these names (sampling.api.teacher_settings maps them).
TEACHER_FLAGS = ("num_steps", "guidance_scale", "randomize_temperature", "softmax_temperature", "mask_schedule",
                 "guidance_annealing", "scale_pow", "use_sampling_annealing", "token_grid")


def define_flags() -> None:
    """Defines this CLI's flags (only when it runs, so importing the module adds no globals
    that could collide with other CLIs in the same process). Idempotent."""
    global _FLAGS_DEFINED
    if _FLAGS_DEFINED:
        return
    _FLAGS_DEFINED = True
    flags.DEFINE_enum("mode", "teacher", ["teacher", "student"], "teacher: the family's multi-step sampler; "
                      "student: the one-step generator.")
    flags.DEFINE_string("generator", None, "Generator checkpoint: a converted teacher (teacher mode) or a "
                        "stage's exported student, <workdir>/<stage>/student (student mode).")
    flags.DEFINE_string("tokenizer", None, "Converted image tokenizer of the family: maskbit_tokenizer (MaskBit), "
                        "taming_vqgan (MaskGIT) or tatitok (MaskGen).")
    flags.DEFINE_string("text_encoder", None, "Converted text tower (text-to-image generators): clip_text (MaskGen) "
                        "or meissonic_text (Meissonic).")
    flags.DEFINE_string("negative_prompt", None, "Text teachers: the CFG branch's caption (default: the family's; "
                        "Meissonic: Di[M]O's negative prompt, MaskGen: empty).")
    flags.DEFINE_string("token_grid", None, "Meissonic: the token grid, H or H,W (64 = 1024 px with the f16 VQ; "
                        "default: the student's stored grid, else 64).")
    flags.DEFINE_string("bpe_merges", None, "CLIP BPE merges file bpe_simple_vocab_16e6.txt.gz (default: "
                        "$SOFTDIMO_CLIP_BPE, else open_clip's).")
    flags.DEFINE_string("labels", None, "Comma-separated class labels, one image each, e.g. 1,7,282.")
    flags.DEFINE_multi_string("prompt", [], "A caption, one image (repeat the flag for more).")
    flags.DEFINE_string("prompt_file", None, "A text file of captions, one per line (after any --prompt).")
    flags.DEFINE_string("out", "grid.png", "Output PNG grid (caption or class under each image).")
    flags.DEFINE_bool("captions", True, "Write the caption or class under each image of the grid "
                      "(--nocaptions: a plain grid).")
    flags.DEFINE_string("out_dir", None, "Also write each image as <out_dir>/<index>.png.")
    flags.DEFINE_string("save_tokens", None, "Optional .npy path for the sampled token ids (MaskBit / MaskGIT / "
                        "Meissonic: (N, h, w); MaskGen: (N, L)).")
    flags.DEFINE_integer("seed", 0, "PRNG seed.")
    flags.DEFINE_integer("nrow", None, "Images per grid row (default ceil(sqrt(N))).")
    flags.DEFINE_integer("num_devices", None, "Devices to shard the batch over (default: all).")
    flags.DEFINE_integer("batch_size", 64, "Samples per jitted call (rounded up to a multiple of the device count).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the generator (params stay float32).")
    # Teacher settings; unset = the family's published defaults.
    flags.DEFINE_integer("num_steps", None, "Teacher decoding steps.")
    flags.DEFINE_float("guidance_scale", None, "Teacher CFG scale (the family's formula; 0 disables CFG on MaskBit).")
    flags.DEFINE_float("randomize_temperature", None, "Teacher Gumbel confidence noise scale.")
    flags.DEFINE_float("softmax_temperature", None, "Teacher sampling temperature.")
    flags.DEFINE_string("mask_schedule", None, "Teacher mask schedule (arccos, cosine, linear, square, root).")
    flags.DEFINE_string("guidance_annealing", None, "MaskBit: CFG annealing (none, linear, cosine).")
    flags.DEFINE_float("scale_pow", None, "MaskBit: power of the power-cos guidance annealing.")
    flags.DEFINE_bool("use_sampling_annealing", None, "MaskBit: temperature 0.5 + 0.8*(1 - progress) instead.")
    # Student (one-step) settings; unset = those the stage stored in model.json, else the family's.
    flags.DEFINE_enum("student_mode", "hard", ["hard", "soft"], "hard: sampled tokens; soft: decode the expected codes.")
    flags.DEFINE_float("student_temperature", None, "Hard one-step sampling temperature (0 = argmax).")
    flags.DEFINE_float("soft_tau", None, "Softmax temperature of the soft decode.")
    flags.DEFINE_float("r_init", None, "MASK fraction of the student's initial state.")
    flags.DEFINE_float("sigma_init", None, "Noise scale of the student's initial embeddings.")
    define_debug_flag()


def parse_labels(text: str | None) -> np.ndarray | None:
    if not text:
        return None
    try:
        labels = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise BadInput(f"--labels must be comma-separated integers, got {text!r} — e.g. --labels 1,7,282") from None
    if not labels:
        raise BadInput("--labels is empty — e.g. --labels 1,7,282")
    return np.asarray(labels, np.int32)


def parse_token_grid(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        grid = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise BadInput(f"--token_grid must be H or H,W (integers), got {text!r} — e.g. --token_grid 64") from None
    if len(grid) not in (1, 2):
        raise BadInput(f"--token_grid must be H or H,W, got {text!r} — e.g. --token_grid 64")
    return grid * 2 if len(grid) == 1 else grid


def gather_prompts(prompts: list[str], prompt_file: str | None) -> list[str] | None:
    """--prompt captions, then --prompt_file's; None when neither is given."""
    captions = list(prompts or [])
    if prompt_file:
        try:
            captions += read_prompts(prompt_file)
        except (FileNotFoundError, ValueError) as e:
            raise BadInput(f"--prompt_file: {e}") from None
    return captions or None


def write_images(images, out_dir: str) -> list[str]:
    """<out_dir>/00000.png, ... one per image."""
    os.makedirs(out_dir, exist_ok=True)
    width = max(5, len(str(len(images) - 1)))
    return [save_image_grid(img[None], os.path.join(out_dir, f"{i:0{width}d}.png"), padding=0)
            for i, img in enumerate(images)]


def main(argv):
    """The command's body: raises on bad input (the CLI entry `cli` prints it in one line)."""
    if len(argv) > 1:
        raise BadInput(f"unexpected arguments {argv[1:]} — every setting is a --flag (see --help)")
    labels = parse_labels(FLAGS.labels)
    captions = gather_prompts(FLAGS.prompt, FLAGS.prompt_file)
    if labels is None and captions is None:
        raise BadInput("nothing to sample — pass --labels 1,7,282 (class generators) or --prompt / --prompt_file "
                       "(text-to-image generators)")
    if labels is not None and captions is not None:
        raise BadInput("pass either --labels or prompts, not both")
    gen = api.load_generator(FLAGS.generator, FLAGS.tokenizer, text_encoder=FLAGS.text_encoder,
                             bpe_merges=FLAGS.bpe_merges, dtype=FLAGS.dtype, negative_prompt=FLAGS.negative_prompt)
    conds = api.make_conditions(gen, labels=labels, captions=captions)
    token_grid = parse_token_grid(FLAGS.token_grid)
    if FLAGS.mode == "teacher":
        given = {k: getattr(FLAGS, k) for k in TEACHER_FLAGS}
        settings = api.teacher_settings(gen, **dict(given, token_grid=token_grid))
        mode = "hard"
    else:
        settings = dict(temperature=FLAGS.student_temperature, soft_tau=FLAGS.soft_tau, r_init=FLAGS.r_init,
                        sigma_init=FLAGS.sigma_init, token_grid=token_grid)
        gen.student_settings(**settings)  # refuses a setting the family lacks, before any compile
        mode = FLAGS.student_mode
    mesh = meshlib.make_mesh(FLAGS.num_devices)
    images, ids = api.generate(gen, conds, kind=FLAGS.mode, mode=mode, seed=FLAGS.seed,
                               batch_size=FLAGS.batch_size, mesh=mesh, settings=settings)
    path = save_image_grid(images, FLAGS.out, nrow=FLAGS.nrow, captions=conds.names() if FLAGS.captions else None)
    if FLAGS.out_dir:
        write_images(images, FLAGS.out_dir)
    if FLAGS.save_tokens:
        np.save(FLAGS.save_tokens, ids)
    print(f"wrote {len(images)} images ({gen.family} {FLAGS.mode}{'' if FLAGS.mode == 'teacher' else ' ' + mode}, "
          f"{images.shape[1]}x{images.shape[2]}) to {path}" + (f" and {FLAGS.out_dir}/" if FLAGS.out_dir else ""))


def cli(argv) -> int:
    return guarded("sample", lambda: main(argv))


if __name__ == "__main__":
    define_flags()
    run_absl(cli)
