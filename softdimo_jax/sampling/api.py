"""One sampling API over every generator family: conditions in, images out.

    gen = load_generator(generator_dir, tokenizer_dir[, text_encoder_dir, bpe_merges])
    conds = make_conditions(gen, labels=[1, 7]) or make_conditions(gen, captions=["a red cube"])
    images, ids = generate(gen, conds, kind="student", mode="soft", seed=0)

`kind` is "teacher" (the family's multi-step sampler) or "student" (the one-step Di[M]O
generator: the σ-perturbed embedding of the random, partly masked initial state, one
forward, exactly what the generator saw in training); `mode` is "hard" (sampled tokens,
decoded) or "soft" (the decoder reads the expectation of the codes under softmax(z / τ):
MaskBit's expected bits, the codebook mixture of MaskGIT's VQGAN and TA-TiTok).

Families are rows of `SAMPLING_FAMILIES`, keyed by the converted generator's family
(`model.json`): the image tokenizer it pairs with, class or text conditions, how its
one-step adapter is built (`core.adapters`), its teacher sampler, and its hard / soft
decode. A new family adds one row. `sample`, `evaluate --generator`, the
at-scale stage grids and the exported students all go through `generate`; TTEO
(`sampling.tteo`) takes its adapter and soft decode from the same rows.

Student settings (r_init, σ, init mask mode, temperature, soft mode / τ, aesthetic score;
Meissonic's token grid and micro-conditions) come from the exported checkpoint's `model.json` ("sampling", written by the stage that
trained it), else the family's defaults; explicit arguments override both.
Batches: chunks of `batch_size` rows padded to a multiple of the mesh size; the chunk at
offset i uses rng fold_in(PRNGKey(seed), i), as `sampling.batching` rows do.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.core.adapters import LFQBertAdapter, MaskGenAdapter, MaskGITAdapter, MeissonicAdapter
from softdimo_jax.data import prompts
from softdimo_jax.models import lfq
from softdimo_jax.models.meissonic import DIMO_MICRO_CONDS, DIMO_NEGATIVE_PROMPT
from softdimo_jax.models.soft_embed import SoftEmbedder
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.converted import ConfigMismatchError, load_converted, read_meta
from softdimo_jax.runtime.errors import BadInput
from softdimo_jax.sampling import maskbit_sampler, maskgit_sampler
from softdimo_jax.sampling.maskgen_sampler import maskgen_generate
from softdimo_jax.sampling.meissonic_sampler import meissonic_generate
from softdimo_jax.sampling.student import one_step_logits

KINDS = ("teacher", "student")
MODES = ("hard", "soft")
# Settings of the one-step student, and the keys model.json's "sampling" may hold.
STUDENT_KEYS = ("r_init", "sigma_init", "init_mask_mode", "temperature", "soft_mode", "soft_tau",
                "aesthetic_score", "token_grid", "micro_conds")


# --------------------------------------------------------------------------- families


def _maskbit_adapter(model, dtype, settings):  # settings: the student's (unused by class families)
    return LFQBertAdapter.from_module(model, dropout=0.0, dtype=dtype, remat=False)


def _maskgit_adapter(model, dtype, settings):
    return MaskGITAdapter.from_module(model, dropout=0.0, dtype=dtype, remat=False)


def _maskgen_adapter(model, dtype, settings):
    # The one-step forward is conditional only: the null condition is never read.
    null = np.zeros((1, 1, model.text_embed_dim), np.float32)
    return MaskGenAdapter.from_module(model, null, null, aesthetic_score=float(settings.get("aesthetic_score", 6.5)),
                                      dtype=dtype, remat=False)


def meissonic_grid(token_grid) -> tuple[int, int]:
    """Meissonic's (H, W) token grid, checked: square (the API's tokens are (B, H·W, 1) and
    the decode reads a square grid) and even (the 2x2 down-sampling)."""
    grid = tuple(int(g) for g in token_grid)
    if len(grid) != 2 or grid[0] != grid[1] or grid[0] % 2 or grid[0] < 2:
        raise BadInput(f"the Meissonic token grid must be a square even (H, W) pair (64, 64 at 1024 px), got "
                       f"{tuple(token_grid)} — pass e.g. --token_grid 64")
    return grid


def _meissonic_adapter(model, dtype, settings):
    # The one-step forward is conditional only: the negative prompt is never read.
    zeros = lambda d: np.zeros((1, 1, d), np.float32)
    return MeissonicAdapter.from_module(
        model, zeros(model.joint_attention_dim), zeros(model.pooled_projection_dim),
        meissonic_grid(settings.get("token_grid", (64, 64))),
        micro_conds=tuple(settings.get("micro_conds", DIMO_MICRO_CONDS)), dtype=dtype, remat=False)


def _maskbit_teacher(model, mesh, settings):
    sample = maskbit_sampler.make_maskbit_teacher_sampler(model, mesh=mesh, **settings)
    return lambda params, rng, cond: sample(params, rng, cond)


def _maskgit_teacher(model, mesh, settings):
    sample = maskgit_sampler.make_maskgit_teacher_sampler(model, mesh=mesh, **settings)
    return lambda params, rng, cond: sample(params, rng, cond).reshape(cond.shape[0], -1, 1)


def _maskgen_teacher(model, mesh, settings):
    settings = dict(settings)
    aes = float(settings.pop("aesthetic_score", 6.5))

    def run(params, rng, cond):
        ids = maskgen_generate(model, params, cond["condition"], cond["pooled"], cond["null_condition"][:1],
                               cond["null_pooled"][:1], rng, aes, **settings)
        return ids[..., None]

    return run


def _meissonic_teacher(model, mesh, settings):
    settings = dict(settings)
    grid = meissonic_grid(settings.pop("token_grid"))
    micro = tuple(float(m) for m in settings.pop("micro_conds"))

    def run(params, rng, cond):
        # CFG over [negative; positive]: every row's negative is the same prompt.
        ids = meissonic_generate(model, params, cond["pooled"][:, 0], cond["condition"], cond["null_pooled"][:1, 0],
                                 cond["null_condition"][:1], jnp.asarray(micro, jnp.float32), rng, grid=grid,
                                 **settings)
        return ids.reshape(ids.shape[0], -1, 1)

    return run


def _maskbit_decode_hard(tok, tp, tokens, cond, gen):
    bits = lfq.subtokens_to_bits(tokens, gen.num_bits, gen.splits)
    return _decode_bits(tok, tp, bits)


def _decode_bits(tok, tp, bits):
    b, n, k = bits.shape
    side = math.isqrt(n)
    # Inference decode: up-sampling convs folded onto the small grid (same function up to
    # round-off, ~26% fewer decoder FLOPs at 14 bits / 256 px; see ConvVQModel.fold_upsample).
    tok = tok.clone(fold_upsample=True)
    return tok.apply({"params": tp}, bits.reshape(b, side, side, k), method=type(tok).decode_bits)


def _maskbit_decode_soft(tok, tp, z, cond, gen, embedder, key):
    return _decode_bits(tok, tp, embedder.bits(z, key))


# MaskGIT's VQGAN and Meissonic's VQ model: ids (B, g, g) / probabilities (B, g, g, K) of a square grid.
def _maskgit_decode_hard(tok, tp, tokens, cond, gen):
    g = math.isqrt(tokens.shape[1])
    return tok.apply({"params": tp}, tokens[..., 0].reshape(-1, g, g), method=type(tok).decode_tokens)


def _maskgit_decode_soft(tok, tp, z, cond, gen, embedder, key):
    g = math.isqrt(z.shape[1])
    probs = embedder.probs(z, key)[:, :, 0]
    return tok.apply({"params": tp}, probs.reshape(-1, g, g, probs.shape[-1]), method=type(tok).decode_soft)


def _maskgen_decode_hard(tok, tp, tokens, cond, gen):
    return tok.apply({"params": tp}, tokens[..., 0], cond["text_guidance"], method=type(tok).decode_tokens)


def _maskgen_decode_soft(tok, tp, z, cond, gen, embedder, key):
    return tok.apply({"params": tp}, embedder.probs(z, key)[:, :, 0], cond["text_guidance"],
                     method=type(tok).decode_soft)


def _maskbit_ids(gen, tokens):
    side = math.isqrt(gen.num_tokens)
    return np.asarray(lfq.merge_splits(tokens, gen.num_bits, gen.splits)).reshape(-1, side, side)


def _maskgit_ids(gen, tokens):
    g = math.isqrt(np.shape(tokens)[1])
    return np.asarray(tokens)[..., 0].reshape(-1, g, g)


def _maskgen_ids(gen, tokens):
    return np.asarray(tokens)[..., 0]


def _maskbit_check(gen, tok):
    if gen.num_bits != tok.num_bits:
        return f"the generator uses {gen.num_bits}-bit tokens but the tokenizer {tok.num_bits}-bit ones"
    if math.isqrt(gen.num_tokens) ** 2 != gen.num_tokens:
        return f"the generator has {gen.num_tokens} tokens, not a square grid"
    return None


def _maskgit_check(gen, tok):
    if gen.codebook_size != tok.n_embed:
        return f"the generator has {gen.codebook_size} codes but the VQGAN {tok.n_embed}"
    return None


def _maskgen_check(gen, tok):
    if tok.codebook_size != gen.codebook_size or tok.num_latent_tokens != gen.seq_len:
        return (f"the tokenizer has {tok.num_latent_tokens} tokens of {tok.codebook_size} codes, the generator "
                f"{gen.seq_len} of {gen.codebook_size}")
    return None


def _meissonic_check(gen, tok):
    if gen.codebook_size != tok.num_vq_embeddings:
        return f"the transformer has {gen.codebook_size} codes but the VQ model {tok.num_vq_embeddings}"
    return None


def _meissonic_text_check(gen, text):
    if (text.width, text.embed_dim) != (gen.joint_attention_dim, gen.pooled_projection_dim):
        return (f"the text tower gives {text.width}-wide states and {text.embed_dim}-wide pooled projections, the "
                f"transformer reads {gen.joint_attention_dim} and {gen.pooled_projection_dim}")
    return None


@dataclasses.dataclass(frozen=True)
class FamilySampling:
    """How one generator family samples (see the module docstring)."""

    conditioning: str  # "class" (integer labels) or "text" (captions through the text tower)
    tokenizer_family: str  # the converted image tokenizer it decodes with
    num_classes: Callable[[Any], int | None]
    adapter: Callable  # (model, dtype, student settings) -> core.adapters adapter
    teacher: Callable  # (model, mesh, teacher settings) -> fn(params, rng, cond) -> tokens (B, L, S)
    decode_hard: Callable  # (tok, tok_params, tokens (B, L, S), cond, gen) -> images
    decode_soft: Callable  # (tok, tok_params, z (B, L, S, V), cond, gen, embedder, key) -> images
    token_ids: Callable  # (gen, tokens (B, L, S)) -> the ids `sample --save_tokens` writes
    soft_output: Callable  # (embedder, z, key) -> {"bits": ...} (MaskBit) or {"probs": ...}: TTEO's soft output
    check_pair: Callable  # (gen, tok) -> None or what does not fit
    student_defaults: dict
    teacher_defaults: dict
    # CLI-level teacher setting names -> this family's sampler keywords.
    teacher_names: dict
    # Text families: the converted text tower's family, its padding, the CFG branch's prompt
    # and (gen, text model) -> None or what does not fit.
    text_family: str = "clip_text"
    text_pad: str = "zero"
    null_prompt: str = ""
    check_text: Callable | None = None


_ONE_STEP = dict(init_mask_mode="position", temperature=1.0, soft_mode="soft", soft_tau=1.0, aesthetic_score=6.5)

SAMPLING_FAMILIES: dict[str, FamilySampling] = {
    "maskbit_generator": FamilySampling(
        conditioning="class", tokenizer_family="maskbit_tokenizer", num_classes=lambda g: g.num_classes,
        adapter=_maskbit_adapter, teacher=_maskbit_teacher, decode_hard=_maskbit_decode_hard,
        decode_soft=_maskbit_decode_soft, token_ids=_maskbit_ids, check_pair=_maskbit_check,
        soft_output=lambda emb, z, key: {"bits": emb.bits(z, key)},
        student_defaults=dict(_ONE_STEP, r_init=0.6, sigma_init=0.1),
        teacher_defaults=dict(maskbit_sampler.IMAGENET_DEFAULTS),
        teacher_names=dict(num_steps="num_steps", guidance_scale="guidance_scale",
                           randomize_temperature="randomize_temperature",
                           softmax_temperature="softmax_temperature", mask_schedule="mask_schedule",
                           guidance_annealing="guidance_annealing", scale_pow="scale_pow",
                           use_sampling_annealing="use_sampling_annealing"),
    ),
    "maskgit_transformer": FamilySampling(
        conditioning="class", tokenizer_family="taming_vqgan", num_classes=lambda g: g.nclass,
        adapter=_maskgit_adapter, teacher=_maskgit_teacher, decode_hard=_maskgit_decode_hard,
        decode_soft=_maskgit_decode_soft, token_ids=_maskgit_ids, check_pair=_maskgit_check,
        soft_output=lambda emb, z, key: {"probs": emb.probs(z, key)},
        student_defaults=dict(_ONE_STEP, r_init=0.6, sigma_init=0.1),
        teacher_defaults=dict(maskgit_sampler.DIMO_TEACHER_DEFAULTS),
        teacher_names=dict(num_steps="num_steps", guidance_scale="cfg_scale", randomize_temperature="r_temp",
                           softmax_temperature="sm_temp", mask_schedule="schedule"),
    ),
    "maskgen_vq": FamilySampling(
        conditioning="text", tokenizer_family="tatitok", num_classes=lambda g: None,
        adapter=_maskgen_adapter, teacher=_maskgen_teacher, decode_hard=_maskgen_decode_hard,
        decode_soft=_maskgen_decode_soft, token_ids=_maskgen_ids, check_pair=_maskgen_check,
        soft_output=lambda emb, z, key: {"probs": emb.probs(z, key)},
        student_defaults=dict(_ONE_STEP, r_init=0.5, sigma_init=0.3),
        teacher_defaults=dict(num_steps=16, guidance_scale=12.0, randomize_temperature=1.5, aesthetic_score=6.5),
        teacher_names=dict(num_steps="num_steps", guidance_scale="guidance_scale",
                           randomize_temperature="randomize_temperature", mask_schedule="mask_schedule",
                           aesthetic_score="aesthetic_score"),
    ),
    # Meissonic: the CLIP-ViT-H-14 tower (ids padded with the end token), CFG over Di[M]O's negative
    # prompt; the VQ model decodes like MaskGIT's VQGAN (ids / codebook mixture of a square grid).
    "meissonic_transformer": FamilySampling(
        conditioning="text", tokenizer_family="meissonic_vqvae", num_classes=lambda g: None,
        adapter=_meissonic_adapter, teacher=_meissonic_teacher, decode_hard=_maskgit_decode_hard,
        decode_soft=_maskgit_decode_soft, token_ids=_maskgit_ids, check_pair=_meissonic_check,
        soft_output=lambda emb, z, key: {"probs": emb.probs(z, key)},
        student_defaults=dict(_ONE_STEP, r_init=0.5, sigma_init=0.3, token_grid=(64, 64), micro_conds=DIMO_MICRO_CONDS),
        # Meissonic's pipeline: 48 steps, guidance 9, Gumbel temperature linspace(2, 0), 1024 px.
        teacher_defaults=dict(num_steps=48, guidance_scale=9.0, temperature=(2.0, 0.0), token_grid=(64, 64),
                              micro_conds=DIMO_MICRO_CONDS),
        teacher_names=dict(num_steps="num_steps", guidance_scale="guidance_scale",
                           randomize_temperature="temperature", token_grid="token_grid"),
        text_family="meissonic_text", text_pad="eot", null_prompt=DIMO_NEGATIVE_PROMPT,
        check_text=_meissonic_text_check,
    ),
}


def family_sampling(family: str) -> FamilySampling:
    if family not in SAMPLING_FAMILIES:
        raise BadInput(f"a {family!r} checkpoint is not a generator — pass one of the families "
                       f"{sorted(SAMPLING_FAMILIES)} (the converted teacher or an exported student)")
    return SAMPLING_FAMILIES[family]


# --------------------------------------------------------------------------- text


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """The text tower (converted clip_text / meissonic_text) and its BPE tokenizer."""

    model: Any
    params: Any
    bpe: Any  # anything with tokenize(list[str]) -> (n, context_length) ids
    pad: str = "zero"  # prompts.tokenize_checked's padding
    null_prompt: str = ""  # the CFG branch's caption (MaskGen: empty; Meissonic: the negative prompt)

    def encode(self, captions: Sequence[str], null_prompt: str | None = None) -> dict:
        """Captions -> {"condition", "pooled", "text_guidance"} rows and the null caption's
        {"null_condition", "null_pooled"} (ids checked against the tower's vocabulary)."""
        texts = list(captions) + [self.null_prompt if null_prompt is None else null_prompt]
        ids = prompts.tokenize_checked(self.model, self.bpe, texts, self.pad)
        out = _clip_forward(self.model, self.params, jnp.asarray(ids))
        return {"condition": np.asarray(out.penultimate[:-1]), "pooled": np.asarray(out.pooled[:-1]),
                "text_guidance": np.asarray(out.text_guidance[:-1]),
                "null_condition": np.asarray(out.penultimate[-1:]), "null_pooled": np.asarray(out.pooled[-1:])}


@functools.partial(jax.jit, static_argnames=("clip_model",))
def _clip_forward(clip_model, clip_params, ids):
    return clip_model.apply({"params": clip_params}, ids)


# --------------------------------------------------------------------------- generators


@dataclasses.dataclass
class Generator:
    """A generator with everything it needs to make images."""

    family: str  # the converted family of `model` (a SAMPLING_FAMILIES key)
    model: Any
    params: Any
    tokenizer: Any
    tokenizer_params: Any
    text: TextEncoder | None = None
    meta: dict = dataclasses.field(default_factory=dict)  # the generator's model.json

    @property
    def spec(self) -> FamilySampling:
        return family_sampling(self.family)

    @property
    def stage(self) -> str:
        """The stage the weights come from ('teacher' for a converted PyTorch checkpoint)."""
        return str(self.meta.get("stage") or "teacher")

    def student_settings(self, **overrides) -> dict:
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - set(self.spec.student_defaults))
        if unknown:
            raise BadInput(f"the {self.family} student has no setting {unknown[0]!r} — drop it "
                           f"(it takes {sorted(self.spec.student_defaults)})")
        stored = {k: v for k, v in (self.meta.get("sampling") or {}).items() if k in STUDENT_KEYS}
        return {**self.spec.student_defaults, **stored, **given}


def _load(path: str, what: str, flag: str, want: str | tuple[str, ...], **overrides):
    if not path:
        raise BadInput(f"no {what} given — pass {flag} (a directory written by python -m softdimo_jax.convert "
                       "or exported by a training stage)")
    try:
        meta = read_meta(path)
    except FileNotFoundError:
        where = "no such directory" if not os.path.isdir(path) else "no model.json there"
        raise BadInput(f"{flag} {path} is not a converted checkpoint ({where}) — pass a directory written by "
                       "python -m softdimo_jax.convert or exported by a training stage (<workdir>/<stage>/student)"
                       ) from None
    except ValueError as e:
        raise BadInput(f"{flag} {path}: {e} — convert it again with python -m softdimo_jax.convert") from None
    want = (want,) if isinstance(want, str) else want
    if meta["family"] not in want:
        raise BadInput(f"{flag} {path} holds a {meta['family']} checkpoint, not a {' / '.join(want)} — "
                       f"pass the {what}")
    try:
        model, params = load_converted(path, **overrides)
    except (ConfigMismatchError, ValueError) as e:
        raise BadInput(f"{flag} {path} does not load: {e}") from None
    return model, params, meta


def load_text_encoder(path: str, bpe_merges: str | None = None, flag: str = "--text_encoder", *,
                      family: str = "clip_text", pad: str = "zero", null_prompt: str = "") -> TextEncoder:
    """The converted text tower of `family` and the CLIP BPE tokenizer (merges file
    `bpe_merges`, else $SOFTDIMO_CLIP_BPE, else the packaged copy)."""
    model, params, _ = _load(path, f"{family} text encoder", flag, family)
    try:
        bpe = prompts.clip_tokenizer(bpe_merges, model.context_length)
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(str(e)) from None
    return TextEncoder(model, params, bpe, pad, null_prompt)


def load_generator(generator: str, tokenizer: str, *, text_encoder: str | None = None,
                   bpe_merges: str | None = None, dtype=None, flags: dict | None = None,
                   negative_prompt: str | None = None) -> Generator:
    """A Generator from converted checkpoints; every problem is a one-line BadInput naming
    the fix. `flags` renames the arguments in messages (default: sample's flag names);
    `negative_prompt` replaces the family's CFG caption (text teachers)."""
    names = {"generator": "--generator", "tokenizer": "--tokenizer", "text_encoder": "--text_encoder",
             **(flags or {})}
    overrides = {"dtype": dtype} if dtype else {}
    model, params, meta = _load(generator, "generator", names["generator"], tuple(SAMPLING_FAMILIES), **overrides)
    spec = family_sampling(meta["family"])
    tok, tok_params, _ = _load(tokenizer, f"{spec.tokenizer_family} image tokenizer", names["tokenizer"],
                               spec.tokenizer_family)
    text = None
    if spec.conditioning == "text":
        if not text_encoder:
            raise BadInput(f"{generator} is a text-to-image {meta['family']} generator — pass "
                           f"{names['text_encoder']} (a converted {spec.text_family} tower) and the prompts")
        text = load_text_encoder(text_encoder, bpe_merges, names["text_encoder"], family=spec.text_family,
                                 pad=spec.text_pad, null_prompt=spec.null_prompt if negative_prompt is None
                                 else negative_prompt)
        problem = spec.check_text(model, text.model) if spec.check_text else None
        if problem:
            raise BadInput(f"{names['text_encoder']} {text_encoder} does not fit the generator: {problem} — pass the "
                           "text tower the generator was trained with")
    gen = Generator(meta["family"], model, params, tok, tok_params, text, meta)
    check_generator(gen)
    return gen


def check_generator(gen: Generator) -> None:
    problem = gen.spec.check_pair(gen.model, gen.tokenizer)
    if problem:
        raise BadInput(f"the generator and tokenizer do not fit: {problem} — pass the matching pair of checkpoints")


# --------------------------------------------------------------------------- conditions


@dataclasses.dataclass(frozen=True)
class Conditions:
    """One image per row: class labels, or captions."""

    labels: np.ndarray | None = None  # (N,) int32
    captions: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.captions)

    def names(self) -> list[str]:
        """What each image shows, for the caption under it in a grid."""
        if self.labels is not None:
            return [f"class {int(y)}" for y in self.labels]
        return list(self.captions)


def check_labels(labels, num_classes: int, what: str = "labels") -> np.ndarray:
    """Labels as int32, refused (not wrapped) outside [0, num_classes)."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise BadInput(f"{what} is empty — pass at least one class label")
    if not np.issubdtype(labels.dtype, np.integer):
        raise BadInput(f"{what} must be integers, got {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise BadInput(f"labels must lie in [0, {num_classes}) for this generator; got {sorted(set(bad.tolist()))} "
                       f"in {what} — pass class ids the model was trained on")
    return labels.astype(np.int32)


def make_conditions(gen: Generator, labels=None, captions=None) -> Conditions:
    """Checks the conditions against the generator: class generators take labels in range,
    text generators take captions."""
    spec = gen.spec
    if spec.conditioning == "class":
        if captions is not None:
            raise BadInput(f"{gen.family} is class-conditional — pass class labels (--labels), not prompts")
        if labels is None:
            raise BadInput(f"{gen.family} is class-conditional — pass class labels, e.g. --labels 1,7,282")
        return Conditions(labels=check_labels(labels, spec.num_classes(gen.model)))
    if labels is not None:
        raise BadInput(f"{gen.family} is text-to-image — pass prompts (--prompt or --prompt_file), not labels")
    captions = [captions] if isinstance(captions, str) else list(captions or [])
    if not captions:
        raise BadInput(f"{gen.family} is text-to-image — pass at least one prompt (--prompt or --prompt_file)")
    return Conditions(captions=tuple(str(c) for c in captions))


# --------------------------------------------------------------------------- sampling


def teacher_settings(gen: Generator, **given) -> dict:
    """The family's teacher sampler keywords from CLI-level names (num_steps,
    guidance_scale, randomize_temperature, softmax_temperature, mask_schedule, ...);
    None values keep the family's defaults; a setting the family lacks is refused."""
    spec = gen.spec
    out = {}
    for k, v in given.items():
        if v is None:
            continue
        if k not in spec.teacher_names:
            raise BadInput(f"the {gen.family} teacher sampler has no setting {k!r} — drop it "
                           f"(it takes {sorted(spec.teacher_names)})")
        out[spec.teacher_names[k]] = v
    return out


def _row_conditions(gen: Generator, conds: Conditions):
    """The conditions as a pytree with a leading row axis (labels, or encoded captions)."""
    if conds.labels is not None:
        return np.asarray(conds.labels, np.int32)
    enc = gen.text.encode(conds.captions)
    n = len(conds)
    return {**{k: enc[k] for k in ("condition", "pooled", "text_guidance")},
            "null_condition": np.repeat(enc["null_condition"], n, 0), "null_pooled": np.repeat(enc["null_pooled"], n, 0)}


def _adapter_labels(cond):
    return {"condition": cond["condition"], "pooled": cond["pooled"]} if isinstance(cond, dict) else cond


def make_batch_sampler(gen: Generator, kind: str = "student", mode: str = "hard", *, mesh=None,
                       settings: dict | None = None, dtype=None) -> Callable:
    """fn(gen_params, tok_params, rng, cond) -> (images (B, H, W, C) in [0, 1], tokens
    (B, L, S)) for one batch of row conditions (B a multiple of the mesh size). Cached: the
    same models, settings and mesh reuse one jitted function (and its compilations), so a
    stage's grids, `sample` and `evaluate` in one process compile once per batch shape."""
    if kind not in KINDS:
        raise BadInput(f"unknown sampler {kind!r} — choose one of {KINDS}")
    if mode not in MODES:
        raise BadInput(f"unknown decode mode {mode!r} — choose one of {MODES}")
    mesh = meshlib.as_auto_mesh(mesh if mesh is not None else meshlib.make_mesh())
    if kind == "teacher":
        if mode == "soft":
            raise BadInput("the teacher samples tokens — use the hard decode for --mode teacher")
        resolved = {**gen.spec.teacher_defaults, **(settings or {})}
    else:
        resolved = gen.student_settings(**(settings or {}))
        if resolved["temperature"] < 0:
            raise BadInput(f"the student temperature must be >= 0 (0 = argmax), got {resolved['temperature']}")
        if not 0.0 <= resolved["r_init"] <= 1.0:
            raise BadInput(f"r_init is a mask ratio in [0, 1], got {resolved['r_init']}")
    dtype = jnp.dtype(dtype if dtype is not None else gen.model.dtype).name
    # model.json gives lists (Meissonic's token grid, micro-conditions): the cache key needs tuples.
    resolved = {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()}
    return _batch_sampler(gen.family, gen.model, gen.tokenizer, kind, mode, mesh,
                          tuple(sorted(resolved.items())), dtype)


@functools.lru_cache(maxsize=32)
def _batch_sampler(family, model, tok, kind, mode, mesh, settings, dtype):
    spec, s = family_sampling(family), dict(settings)
    out_sh = meshlib.replicated(mesh)
    if kind == "teacher":
        run = spec.teacher(model, mesh, s)
        decode = jax.jit(lambda tp, tokens, cond: jnp.clip(spec.decode_hard(tok, tp, tokens, cond, model), 0, 1),
                         out_shardings=out_sh)

        def teacher_fn(gp, tp, rng, cond):
            tokens = run(gp, rng, cond)
            return decode(tp, tokens, cond), tokens

        return teacher_fn

    adapter = spec.adapter(model, dtype, s)
    embedder = SoftEmbedder(mode=str(s["soft_mode"]), tau=float(s["soft_tau"]))
    gumbel = str(s["soft_mode"]).startswith("gumbel")

    def fn(gp, tp, rng, cond):
        k_in, k_out = jax.random.split(rng)
        z = one_step_logits(adapter, gp, k_in, _adapter_labels(cond), r_init=float(s["r_init"]),
                            sigma_init=float(s["sigma_init"]), init_mask_mode=str(s["init_mask_mode"]))
        tokens = jnp.argmax(z, axis=-1).astype(jnp.int32)
        if mode == "soft":
            images = spec.decode_soft(tok, tp, z, cond, model, embedder, k_out if gumbel else None)
        else:
            if s["temperature"] > 0:
                tokens = jax.random.categorical(k_out, z / s["temperature"], axis=-1).astype(jnp.int32)
            images = spec.decode_hard(tok, tp, tokens, cond, model)
        return jnp.clip(images, 0.0, 1.0), tokens

    return jax.jit(fn, out_shardings=(out_sh, out_sh))


def generate(gen: Generator, conds: Conditions, *, kind: str = "student", mode: str = "hard", seed: int = 0,
             batch_size: int = 64, mesh=None, settings: dict | None = None, dtype=None,
             params=None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, C) in [0, 1] and token ids (family layout, see `token_ids`) of every
    row of `conds`; `params` replaces gen.params (e.g. a training state's EMA weights)."""
    mesh = meshlib.as_auto_mesh(mesh if mesh is not None else meshlib.make_mesh())
    sample = make_batch_sampler(gen, kind, mode, mesh=mesh, settings=settings, dtype=dtype)
    rows = _row_conditions(gen, conds)
    n = len(conds)
    chunk = max(mesh.size, -(-max(int(batch_size), 1) // mesh.size) * mesh.size)
    rep = meshlib.replicated(mesh)
    gp = jax.device_put(gen.params if params is None else params, rep)
    tp = jax.device_put(gen.tokenizer_params, rep)
    base = jax.random.PRNGKey(seed)
    images, ids = [], []
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        keep = len(idx)
        idx = np.concatenate([idx, np.full(-keep % mesh.size, idx[0])])  # padding rows, dropped below
        cond = jax.tree.map(lambda x: x[idx], rows)
        if isinstance(cond, np.ndarray):
            cond[keep:] = 0
        img, tok = sample(gp, tp, jax.random.fold_in(base, start), meshlib.shard_batch(cond, mesh))
        images.append(np.asarray(img)[:keep])
        ids.append(gen.spec.token_ids(gen.model, np.asarray(tok)[:keep]))
    return np.concatenate(images), np.concatenate(ids)


def student_settings_from_config(dcfg) -> dict:
    """The one-step settings of a distill config block (stored in an exported student's
    model.json, so `sample` and `evaluate` sample it as the stage did)."""
    out = dict(r_init=float(dcfg.r_init), sigma_init=float(dcfg.sigma_init),
               init_mask_mode=str(dcfg.init_mask_mode), temperature=float(dcfg.sample.temperature),
               soft_mode=str(dcfg.soft.mode), soft_tau=float(dcfg.soft.tau),
               aesthetic_score=float(dcfg.get("aesthetic_score", 6.5)))
    for k in ("token_grid", "micro_conds"):  # Meissonic's (its model does not know them)
        if dcfg.get(k):
            out[k] = [float(v) if k == "micro_conds" else int(v) for v in dcfg[k]]
    return out
