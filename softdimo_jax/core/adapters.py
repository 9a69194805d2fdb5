"""Model adapters: how the distillation algorithm talks to one teacher architecture.

An adapter holds two clones of one Flax module class: `teacher` (frozen, deterministic,
never remat) and `student` (generator and auxiliary: the distillation dropout, compute
dtype and remat setting); parameters are shared in layout. It exposes the token layout
(num_tokens, splits S, vocab_size V, mask_token, num_classes), `embed`,
`student_logits` -> (B, L, S, V), `teacher_logits`, and the parameter paths of the
logical frozen groups (`frozen_groups`).

MaskBit (`LFQBert`): (B, L, S) sub-token ids, S splits of the LFQ bits.

MaskGIT (`MaskGITTransformer`): the head returns K + 1 logits (visual tokens and MASK);
generator, auxiliary and teacher distributions use the K visual columns only, so the
generator never samples MASK and the teacher's p_T is renormalised over real tokens.
Classes are integer labels; the CFG branch uses the null class (`drop_label`).
Frozen groups (Di[M]O): `tok_emb` (the one table holds visual tokens, MASK, classes and the
null class, and it is ALSO the output projection: the head is x @ tok_embᵀ + bias, so
freezing the input embedding freezes the head's weights too), `bias`, `pos_emb`.

MaskGen (`MaskGenVQ`): the condition is text. The "labels" the Distiller passes around are
a dict {"condition": (B, T, W), "pooled": (B, 1, E)} of OpenCLIP outputs, drawn by
`draw_labels` from the per-step conditions batch the step receives (rows of the encoded
prompt table, see `softdimo_jax.data.prompts`). The CFG branch replaces a row by the null
(empty or negative prompt) condition held by the adapter. Guidance is MaskGen's
c + s(c − u) (`cfg_formula='cond_plus'`). The aesthetic micro-condition is a constant score.
Frozen groups: `embeddings` (tied with the head: logits = x @ E[:K]ᵀ), `pos_embed`; MaskGen's
head has no bias, so 'output_bias' names no parameter here.
MaskGen has no dropout; `distill.dropout` must be 0 for it.

Meissonic (`MeissonicTransformer`): text conditions in the same dict layout as MaskGen's
({"condition": (B, T, D) penultimate CLIP-H states, "pooled": (B, 1, P) pooled projection}),
the fixed micro-conditions and timestep 0 of Di[M]O's calls, CFG uncond + s·(cond − uncond)
(`cfg_formula='uncond_plus'`) with the negative prompt as the null condition. The token grid
(H, W) comes from `distill.token_grid`; ids are flattened row-major to L = H·W. `embed` is the
output of the model's embedding block (Embedding -> RMSNorm -> 1x1 conv), which is where
Di[M]O's `noise_emb_perturb` acts: the Distiller's σ-perturbation of `embed`'s output is
exactly that call, with the noise drawn from the step's rng. Soft tokens p @ E go through
the same block (`embed_soft`: the RMSNorm after the expectation). The head covers the K real
codes only (no MASK column). Frozen groups: `input_embedding` (the embedding block: table,
RMSNorm, 1x1 conv) and `output_head` (the MLM head's conv, RMSNorm, conv), Di[M]O's
fix_emb_layer; Meissonic has no output bias and no learned position embedding (RoPE). No
dropout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.models import lfq
from softdimo_jax.models.clip_text import drop_to_null
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.models.maskgen import MaskGenVQ
from softdimo_jax.models.maskgit import MaskGITTransformer
from softdimo_jax.models.meissonic import DIMO_MICRO_CONDS, MeissonicTransformer
from softdimo_jax.models.meissonic_vq import MeissonicVQModel


def teacher_student_clones(module: nn.Module, *, dropout: float | None = None, dtype=None,
                           remat: bool | None = None):
    """(teacher, student) copies of one module class for an adapter: both in `dtype` (default
    the module's); the teacher never remats (no backward through it); the student takes
    `remat` and `dropout` when given (None keeps the module's)."""
    dtype = module.dtype if dtype is None else jnp.dtype(dtype)
    teacher = module.clone(dtype=dtype, remat=False)
    overrides = dict(dtype=dtype, remat=module.remat if remat is None else bool(remat))
    if dropout is not None:
        overrides["dropout"] = float(dropout)
    return teacher, module.clone(**overrides)


@dataclasses.dataclass(frozen=True)
class LFQBertAdapter:
    """Wraps a MaskBit `LFQBert` for distillation.

    `teacher` runs deterministically; `student` (generator and auxiliary) carries the
    distillation dropout, compute dtype and remat setting. Parameters are shared in layout.
    """

    teacher: nn.Module
    student: nn.Module
    # PRNG of the dropout masks: 'threefry' (default; identical on any mesh) or 'rbg' /
    # 'unsafe_rbg' (XLA's RngBitGenerator: about half the CPU cost per mask, but the masks
    # may depend on the sharding and the XLA version).
    dropout_rng: str = "threefry"

    # Logical frozen groups -> parameter paths of this architecture.
    frozen_groups = {
        "input_embedding": ("input_proj",),
        "output_bias": ("prediction/bias",),
        "position_embedding": ("pos_emb",),
    }

    @classmethod
    def from_module(cls, module: nn.Module, *, dropout: float | None = None, dtype=None,
                    remat: bool | None = None, dropout_rng: str = "threefry") -> "LFQBertAdapter":
        teacher, student = teacher_student_clones(module, dropout=dropout, dtype=dtype, remat=remat)
        if dropout_rng not in ("threefry", "rbg", "unsafe_rbg"):
            raise ValueError(f"dropout_rng must be 'threefry', 'rbg' or 'unsafe_rbg', got {dropout_rng!r}")
        return cls(teacher=teacher, student=student, dropout_rng=dropout_rng)

    # Shapes.
    @property
    def num_tokens(self) -> int:
        return self.student.num_tokens

    @property
    def splits(self) -> int:
        return self.student.splits

    @property
    def vocab_size(self) -> int:
        return self.student.vocab_size

    @property
    def mask_token(self) -> int:
        return self.student.mask_token

    @property
    def num_classes(self) -> int:
        return self.student.num_classes

    @property
    def student_dropout(self) -> float:
        return float(self.student.dropout)

    # Calls.
    def embed(self, params, tokens):
        """(B, L, S) sub-token ids -> (B, L, d) input embeddings of the student."""
        bits = lfq.subtokens_to_bits(tokens, self.student.num_bits, self.student.splits)
        return self.student.apply({"params": params}, bits, method=type(self.student).embed_bits)

    def student_logits(self, params, labels, *, tokens=None, embeddings=None, rng=None):
        """Generator / auxiliary forward; dropout active when rng is given."""
        train = rng is not None and self.student_dropout > 0
        if train and self.dropout_rng != "threefry":
            rng = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl=self.dropout_rng)
        return self.student.apply(
            {"params": params}, tokens, labels, input_embeddings=embeddings,
            deterministic=not train, rngs={"dropout": rng} if train else None,
        )

    def teacher_logits(self, params, tokens, labels, drop_label_mask=None):
        return self.teacher.apply(
            {"params": params}, tokens, labels, drop_label_mask=drop_label_mask, deterministic=True
        )



def _only_split(tokens):
    """(B, L, 1) ids -> (B, L); the Distiller keeps a split axis of size 1 for these models."""
    if tokens.ndim != 3 or tokens.shape[-1] != 1:
        raise ValueError(f"expected (B, L, 1) token ids (S = 1), got shape {tokens.shape}")
    return tokens[..., 0]


@dataclasses.dataclass(frozen=True)
class MaskGITAdapter:
    teacher: nn.Module
    student: nn.Module

    frozen_groups = {
        # tok_emb is tied with the output head (logits = x @ tok_embᵀ + bias).
        "input_embedding": ("tok_emb",),
        "output_bias": ("bias",),
        "position_embedding": ("pos_emb",),
    }

    @classmethod
    def from_module(cls, module: nn.Module, *, dropout: float | None = None, dtype=None,
                    remat: bool | None = None) -> "MaskGITAdapter":
        teacher, student = teacher_student_clones(module, dropout=dropout, dtype=dtype, remat=remat)
        return cls(teacher=teacher, student=student)

    num_tokens = property(lambda self: self.student.num_tokens)
    splits = property(lambda self: 1)
    vocab_size = property(lambda self: self.student.codebook_size)  # MASK column dropped
    mask_token = property(lambda self: self.student.mask_token)
    num_classes = property(lambda self: self.student.nclass)
    student_dropout = property(lambda self: float(self.student.dropout))

    def embed(self, params, tokens):
        return self.student.apply({"params": params}, _only_split(tokens),
                                  method=type(self.student).embed_tokens)

    def _visual(self, logits):
        return logits[..., : self.vocab_size][:, :, None, :]

    def student_logits(self, params, labels, *, tokens=None, embeddings=None, rng=None):
        train = rng is not None and self.student_dropout > 0
        logits = self.student.apply(
            {"params": params}, None if tokens is None else _only_split(tokens), labels,
            input_embeddings=embeddings, deterministic=not train,
            rngs={"dropout": rng} if train else None,
        )
        return self._visual(logits)

    def teacher_logits(self, params, tokens, labels, drop_label_mask=None):
        logits = self.teacher.apply({"params": params}, _only_split(tokens), labels,
                                    drop_label=drop_label_mask, deterministic=True)
        return self._visual(logits)


@dataclasses.dataclass(frozen=True, eq=False)
class MaskGenAdapter:
    """`null_condition` (1, T, W) and `null_pooled` (1, 1, E): the CFG branch's condition
    (the empty caption's OpenCLIP outputs, or a negative prompt's)."""

    teacher: nn.Module
    student: nn.Module
    null_condition: Any
    null_pooled: Any
    aesthetic_score: float = 6.5

    frozen_groups = {
        # embeddings is tied with the output head (logits = x @ E[:K]ᵀ, no bias).
        "input_embedding": ("embeddings",),
        "output_bias": (),
        "position_embedding": ("pos_embed",),
    }

    @classmethod
    def from_module(cls, module: nn.Module, null_condition, null_pooled, *, aesthetic_score: float = 6.5,
                    dropout: float | None = None, dtype=None, remat: bool | None = None) -> "MaskGenAdapter":
        if dropout:
            raise ValueError(f"MaskGenVQ has no dropout layers; set distill.dropout=0 (got {dropout})")
        null_condition = np.asarray(null_condition, np.float32)
        null_pooled = np.asarray(null_pooled, np.float32)
        if null_condition.ndim == 2:
            null_condition = null_condition[None]
        null_pooled = null_pooled.reshape(1, 1, -1)
        if null_condition.shape[0] != 1 or null_condition.shape[-1] != module.text_embed_dim:
            raise ValueError(
                f"null_condition must be (1, T, {module.text_embed_dim}) (the empty / negative prompt's "
                f"penultimate OpenCLIP tokens), got {null_condition.shape}"
            )
        teacher, student = teacher_student_clones(module, dtype=dtype, remat=remat)  # no dropout field
        return cls(teacher, student, null_condition, null_pooled, float(aesthetic_score))

    num_tokens = property(lambda self: self.student.seq_len)
    splits = property(lambda self: 1)
    vocab_size = property(lambda self: self.student.codebook_size)
    mask_token = property(lambda self: self.student.mask_token_id)
    student_dropout = property(lambda self: 0.0)

    @property
    def num_classes(self) -> int:
        raise AttributeError("MaskGen is text-conditioned: conditions come from draw_labels, not class ids")

    def draw_labels(self, rng, batch: int, conditions):
        """The batch's text conditions: the rows of `conditions` ({"condition": (N, T, W),
        "pooled": (N, 1, E)}, plus any other per-row entries), as they are when N == batch,
        else `batch` rows drawn uniformly (the rng)."""
        if conditions is None:
            raise ValueError(
                "MaskGen distillation needs text conditions: pass the step a conditions batch "
                "(softdimo_jax.data.prompts.PromptConditions.batch_fn)"
            )
        missing = {"condition", "pooled"} - set(conditions)
        if missing:
            raise ValueError(f"conditions batch lacks {sorted(missing)}; it needs 'condition' and 'pooled'")
        n = conditions["condition"].shape[0]
        # Other per-row entries (TA-TiTok's text_guidance, reward_text for text-to-image
        # rewards) ride along with their rows.
        picked = {**conditions, "condition": conditions["condition"], "pooled": conditions["pooled"].reshape(n, 1, -1)}
        if n == batch:
            return picked
        idx = jax.random.randint(rng, (batch,), 0, n)
        return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), picked)

    def embed(self, params, tokens):
        return self.student.apply({"params": params}, _only_split(tokens),
                                  method=type(self.student).embed_tokens)

    def _apply(self, module, params, labels, tokens, embeddings):
        logits = module.apply(
            {"params": params}, tokens, labels["condition"], labels["pooled"],
            jnp.full((labels["condition"].shape[0],), self.aesthetic_score, jnp.float32),
            input_embeddings=embeddings,
        )
        return logits[:, :, None, :]

    def student_logits(self, params, labels, *, tokens=None, embeddings=None, rng=None):
        del rng  # no dropout in MaskGen
        return self._apply(self.student, params, labels,
                           None if tokens is None else _only_split(tokens), embeddings)

    def teacher_logits(self, params, tokens, labels, drop_label_mask=None):
        if drop_label_mask is not None:
            cond, pooled = drop_to_null(labels["condition"], labels["pooled"], self.null_condition,
                                        self.null_pooled, drop_label_mask)
            labels = {"condition": cond, "pooled": pooled}
        return self._apply(self.teacher, params, labels, _only_split(tokens), None)


def _meissonic_soft_block(model, probs):
    return model.embed_block(input_embeddings=model.embed_probs(probs))


@dataclasses.dataclass(frozen=True, eq=False)
class MeissonicAdapter:
    """`null_condition` (1, T, D) / `null_pooled` (1, 1, P): the CFG branch's (negative prompt's)
    CLIP-H outputs; `grid` (H, W) the token grid; `micro_conds` the 5 micro-conditions of
    every call (Di[M]O: 1024, 1024, 0, 0, 6); the timestep is 0 (Di[M]O's mask_ratio.long())."""

    teacher: nn.Module
    student: nn.Module
    null_condition: Any
    null_pooled: Any
    grid: tuple
    micro_conds: tuple = DIMO_MICRO_CONDS

    frozen_groups = {
        # Di[M]O's fix_emb_layer freezes the whole embedding block and the MLM head.
        "input_embedding": ("embed_embeddings", "embed_layer_norm", "embed_conv"),
        "output_head": ("mlm_conv1", "mlm_layer_norm", "mlm_conv2"),
        "output_bias": (),  # the MLM head has no bias
        "position_embedding": (),  # RoPE: nothing learned
    }

    @classmethod
    def from_module(cls, module: nn.Module, null_condition, null_pooled, grid, *,
                    micro_conds=DIMO_MICRO_CONDS, dropout: float | None = None, dtype=None,
                    remat: bool | None = None) -> "MeissonicAdapter":
        if dropout:
            raise ValueError(f"MeissonicTransformer has no dropout layers; set distill.dropout=0 (got {dropout})")
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2 or grid[0] % 2 or grid[1] % 2 or min(grid) < 2:
            raise ValueError(f"distill.token_grid must be an even (H, W) pair (64, 64 at 1024 px), got {grid}")
        null_condition = np.asarray(null_condition, np.float32)
        if null_condition.ndim == 2:
            null_condition = null_condition[None]
        null_pooled = np.asarray(null_pooled, np.float32).reshape(1, 1, -1)
        if null_condition.shape[0] != 1 or null_condition.shape[-1] != module.joint_attention_dim:
            raise ValueError(f"null_condition must be (1, T, {module.joint_attention_dim}) (the negative prompt's "
                             f"penultimate CLIP states), got {null_condition.shape}")
        if null_pooled.shape[-1] != module.pooled_projection_dim:
            raise ValueError(f"null_pooled must have {module.pooled_projection_dim} entries (the negative prompt's "
                             f"pooled projection), got {null_pooled.shape}")
        micro_conds = tuple(float(m) for m in micro_conds)
        if len(micro_conds) != 5:
            raise ValueError(f"micro_conds must be 5 numbers (width, height, crop top, crop left, aesthetic), "
                             f"got {micro_conds}")
        teacher, student = teacher_student_clones(module, dtype=dtype, remat=remat)  # no dropout field
        return cls(teacher, student, null_condition, null_pooled, grid, micro_conds)

    num_tokens = property(lambda self: self.grid[0] * self.grid[1])
    splits = property(lambda self: 1)
    vocab_size = property(lambda self: self.student.codebook_size)  # the head's K real codes
    mask_token = property(lambda self: self.student.mask_token_id)
    student_dropout = property(lambda self: 0.0)

    @property
    def num_classes(self) -> int:
        raise AttributeError("Meissonic is text-conditioned: conditions come from draw_labels, not class ids")

    def draw_labels(self, rng, batch: int, conditions):
        """As MaskGen's: the batch's rows of {"condition", "pooled"} (drawn when N != batch)."""
        if conditions is None:
            raise ValueError("Meissonic distillation needs text conditions: pass the step a conditions batch "
                             "(softdimo_jax.data.prompt_embeddings)")
        return MaskGenAdapter.draw_labels(self, rng, batch, conditions)

    def _ids(self, tokens):
        return _only_split(tokens).reshape(-1, *self.grid)

    def embed(self, params, tokens):
        """(B, L, 1) ids -> (B, H, W, C) embedding-block output (what Di[M]O perturbs)."""
        return self.student.apply({"params": params}, self._ids(tokens), method=type(self.student).embed_block)

    def embed_soft(self, params, probs):
        """(B, L, 1, K) or (B, L, K) probabilities -> (B, H, W, C): p @ E through the embedding
        block (Meissonic's RMSNorm applied after the expectation)."""
        probs = probs.reshape(-1, *self.grid, probs.shape[-1])
        return self.student.apply({"params": params}, probs, method=_meissonic_soft_block)

    def _apply(self, module, params, labels, tokens, embeddings):
        b = labels["condition"].shape[0]
        micro = jnp.broadcast_to(jnp.asarray(self.micro_conds, jnp.float32), (b, 5))
        logits = module.apply(
            {"params": params}, None if tokens is None else self._ids(tokens), labels["condition"],
            labels["pooled"].reshape(b, -1), micro, jnp.zeros((b,), jnp.float32), embedded=embeddings)
        return logits.reshape(b, self.num_tokens, 1, -1)

    def student_logits(self, params, labels, *, tokens=None, embeddings=None, rng=None):
        """`embeddings`: embedding-block outputs (B, H, W, C) (from `embed` / `embed_soft`)."""
        del rng  # no dropout in Meissonic
        return self._apply(self.student, params, labels, tokens, embeddings)

    def teacher_logits(self, params, tokens, labels, drop_label_mask=None, *, embeddings=None):
        """Rows where drop_label_mask is true take the negative prompt's condition. `embeddings`
        (instead of tokens, pass tokens=None): soft inputs from `embed_soft`."""
        if drop_label_mask is not None:
            m = jnp.asarray(drop_label_mask, bool).reshape(-1, 1, 1)
            labels = {"condition": jnp.where(m, self.null_condition, labels["condition"]),
                      "pooled": jnp.where(m, self.null_pooled, labels["pooled"])}
        return self._apply(self.teacher, params, labels, tokens, embeddings)

    # Decode-to-image hooks (reward / TTEO through soft embeddings into the VQ decoder).
    def soft_images(self, vq: MeissonicVQModel, vq_params, logits, tau: float = 1.0):
        """(B, L, 1, K) logits -> images (B, H·f, W·f, 3) of softmax(z/τ) @ codebook (unclipped)."""
        probs = jax.nn.softmax(logits.astype(jnp.float32) / tau, axis=-1).reshape(-1, *self.grid, logits.shape[-1])
        return vq.apply({"params": vq_params}, probs, method=type(vq).decode_soft)

    def token_images(self, vq: MeissonicVQModel, vq_params, tokens):
        """(B, L, 1) ids -> images (B, H·f, W·f, 3) (codebook lookup, unclipped)."""
        return vq.apply({"params": vq_params}, self._ids(tokens), method=type(vq).decode_tokens)


def make_adapter(module: nn.Module, config, **kwargs):
    """The adapter for `module` under `config` (a distill ConfigDict).

    MaskGen needs keyword arguments `null_condition` (1, T, W) and `null_pooled` (1, 1, E)
    (`softdimo_jax.data.prompts.PromptConditions` holds them); `config.aesthetic_score`
    (default 6.5) is its micro-condition. The other families take no keyword arguments."""
    if isinstance(module, (LFQBert, MaskGITTransformer)) and kwargs:
        raise TypeError(f"the {type(module).__name__} adapter takes no extra arguments, got {sorted(kwargs)}")
    if isinstance(module, LFQBert):
        return LFQBertAdapter.from_module(
            module, dropout=config.dropout, dtype=config.compute_dtype, remat=config.remat,
            dropout_rng=config.get("dropout_rng", "threefry"),
        )
    if isinstance(module, MaskGITTransformer):
        return MaskGITAdapter.from_module(module, dropout=config.dropout, dtype=config.compute_dtype,
                                          remat=config.remat)
    if isinstance(module, MaskGenVQ):
        if "null_condition" not in kwargs or "null_pooled" not in kwargs:
            raise ValueError(
                "MaskGen distillation needs the null (empty / negative prompt) condition: "
                "make_adapter(model, config, null_condition=..., null_pooled=...) "
                "(softdimo_jax.data.prompts.PromptConditions holds both)"
            )
        return MaskGenAdapter.from_module(
            module, kwargs.pop("null_condition"), kwargs.pop("null_pooled"),
            aesthetic_score=config.get("aesthetic_score", 6.5),
            dropout=config.dropout, dtype=config.compute_dtype, remat=config.remat, **kwargs)
    if isinstance(module, MeissonicTransformer):
        if "null_condition" not in kwargs or "null_pooled" not in kwargs:
            raise ValueError(
                "Meissonic distillation needs the negative prompt's condition: "
                "make_adapter(model, config, null_condition=..., null_pooled=...)")
        if not config.get("token_grid"):
            raise ValueError("Meissonic distillation needs distill.token_grid (H, W) (64, 64 at 1024 px)")
        return MeissonicAdapter.from_module(
            module, kwargs.pop("null_condition"), kwargs.pop("null_pooled"), tuple(config.token_grid),
            micro_conds=tuple(config.get("micro_conds", DIMO_MICRO_CONDS)),
            dropout=config.dropout, dtype=config.compute_dtype, remat=config.remat, **kwargs)
    raise NotImplementedError(
        f"no distillation adapter for {type(module).__name__}; add one in softdimo_jax/core/adapters.py"
    )
