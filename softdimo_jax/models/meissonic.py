"""Meissonic's `Transformer2DModel` (Flux-style MM-DiT over a 2x2-down-sampled token grid) in Flax.

Parameter-compatible with the released diffusers-format state dict (see
`softdimo_jax.conversion.meissonic`); field names are those of its config.json.
Layout here is NHWC: tokens (B, H, W), logits (B, H, W, K) (the original returns
(B, K, H, W); Di[M]O reshapes to (B, H·W, K), which is our reshape of the same array).

Forward (facts from the original, `fixtures/README.md` lists them):
- ids -> Embedding -> RMSNorm -> 1x1 conv (no bias) [-> Di[M]O's noise_emb_perturb] ->
  RMSNorm over channels -> zero-pad bottom/right -> 2x2 stride-2 conv (no bias) ->
  flatten row-major -> RMSNorm -> Linear;
- text: context_embedder (Linear with bias) -> RMSNorm;
- conditioning: pooled text ++ five 256-d [cos | sin] sinusoids of the micro-conditions ->
  cond_embed (Linear, SiLU, Linear, no biases) -> text_embedder (Linear, SiLU, Linear);
  temb = that + timestep_embedder(sinusoid(1000·t));
- dual-stream blocks, then single-stream blocks on [text; image]; the text rows dropped;
- RMSNorm -> Linear -> (H/2, W/2) grid -> RMSNorm -> ConvTranspose 2x2 stride 2 (no
  bias) -> 1x1 conv -> RMSNorm -> 1x1 conv to the K codes (no bias).
Every RMSNorm is x·rsqrt(mean(x²) + 1e-6)·w in float32. RoPE over [text; image] with the
ids (0, row, col) of the down-sampled grid (text ids all 0); per axis the frequencies
10⁴^(−2j/d), cos/sin repeated pairwise and applied to adjacent pairs of q and k after their
per-head RMSNorm.

Extras over the original: `input_embeddings=` takes p @ E (the soft tokens of SPEC §1.2,
before the embedding RMSNorm, which is applied after the expectation), `perturb_noise` /
`noise_emb_perturb` are Di[M]O's perturbed initial embeddings with the noise as an input,
`embedded=` enters after the embedding block (the perturbed embedding TTEO optimises), and
`return_intermediates=True` returns the activations the parity fixture records.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.models.lean_grads import softmax_f32
from softdimo_jax.models.maskgen import FeedForward

_EPS = 1e-6
MICRO_COND_DIM = 256  # per micro-condition sinusoid (aMUSEd's micro_cond_encode_dim)
NUM_MICRO_CONDS = 5  # width, height, crop top, crop left, aesthetic score
# Di[M]O's micro-conditions at 1024 px: [1024, 1024, 0, 0, 6].
DIMO_MICRO_CONDS = (1024.0, 1024.0, 0.0, 0.0, 6.0)
# Di[M]O's negative prompt (`distil_neg_prompt`, also Meissonic's inference script's): the CFG branch's text.
DIMO_NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, signature, "
                        "text, jpeg artifacts, signature, sketch, duplicate, ugly, identifying mark")


def rms_norm(x, weight, eps: float = _EPS):
    """diffusers RMSNorm: statistics in float32, learned scale, no bias."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return rms_norm(x, w).astype(self.dtype)


def _layer_norm(x):
    # LayerNorm without affine, eps 1e-6, float32 two-pass statistics.
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + _EPS)).astype(x.dtype)


def sinusoid_frequencies(dim: int = MICRO_COND_DIM) -> np.ndarray:
    """diffusers get_timestep_embedding's frequencies exp(−ln(10⁴)·i/half), built in float32
    the way torch builds them (the phases reach 10³–10⁶ rad, so rounding shows)."""
    half = dim // 2
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_sinusoid(t, dim: int = MICRO_COND_DIM):
    """(N,) values -> (N, dim) [cos | sin] (flip_sin_to_cos=True, downscale_freq_shift=0)."""
    args = jnp.asarray(t, jnp.float32).reshape(-1)[:, None] * jnp.asarray(sinusoid_frequencies(dim))[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, 1))) if dim % 2 else emb


def micro_cond_embedding(micro_conds):
    """(B, 5) micro-conditions -> (B, 5·256) concatenated sinusoids."""
    micro_conds = jnp.asarray(micro_conds, jnp.float32)
    b = micro_conds.shape[0]
    return timestep_sinusoid(micro_conds.reshape(-1)).reshape(b, -1)


def image_ids(h: int, w: int) -> np.ndarray:
    """RoPE ids (h·w, 3) of a (h, w) grid: rows (0, row, col), row-major (the pipeline's
    `_prepare_latent_image_ids` for the down-sampled grid)."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def rope_tables(ids, axes_dims: Sequence[int]):
    """(S, n_axes) position ids -> cos, sin (S, sum(axes_dims)) float32, interleaved pairs.

    Host arrays are computed in float64 like the original (FluxPosEmbed); traced ids in float32.
    """
    on_host = isinstance(ids, np.ndarray)
    xp = np if on_host else jnp
    ids = ids.astype(np.float64) if on_host else jnp.asarray(ids, jnp.float32)
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        if d % 2:
            raise ValueError(f"RoPE axis dims must be even, got {tuple(axes_dims)}")
        freqs = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d))
        ang = ids[:, i][:, None] * (freqs if on_host else jnp.asarray(freqs, jnp.float32))[None]
        cos.append(xp.repeat(xp.cos(ang), 2, axis=1))
        sin.append(xp.repeat(xp.sin(ang), 2, axis=1))
    cos, sin = xp.concatenate(cos, axis=1), xp.concatenate(sin, axis=1)
    return jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)


def apply_rope(x, cos, sin):
    """x (B, S, heads, hd); pairs (x₂ⱼ, x₂ⱼ₊₁) -> (x₂ⱼ·c − x₂ⱼ₊₁·s, x₂ⱼ₊₁·c + x₂ⱼ·s)."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (x32 * c + rotated * s).astype(x.dtype)


def guided_logits(cond_logits, uncond_logits, scale):
    """Meissonic / Di[M]O guidance: uncond + s·(cond − uncond)."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


class MLP2(nn.Module):
    """Linear -> SiLU -> Linear (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, name="linear_2")(nn.silu(h))


def _attention(q, k, v, dtype):
    hd = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
    probs = softmax_f32(logits, dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class QKV(nn.Module):
    """q/k/v projections (with bias) of one stream and the per-head q/k RMSNorm."""

    heads: int
    head_dim: int
    prefix: str = ""  # "" -> to_q, norm_q ...; "add" -> add_q_proj, norm_added_q ...
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.heads * self.head_dim
        names = (("to_q", "to_k", "to_v", "norm_q", "norm_k") if not self.prefix else
                 ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"))
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)
        q, k, v = (split(nn.Dense(d, dtype=self.dtype, name=n)(x)) for n in names[:3])
        q = RMSNorm(self.dtype, name=names[3])(q)
        k = RMSNorm(self.dtype, name=names[4])(k)
        return q, k, v


class DualBlock(nn.Module):
    """Dual-stream MM-DiT block (`TransformerBlock`): both streams complete in every block."""

    heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c, temb, cos, sin):
        d = self.heads * self.head_dim
        silu_t = nn.silu(temb)
        mods = nn.Dense(6 * d, dtype=self.dtype, name="norm1")(silu_t)
        cmods = nn.Dense(6 * d, dtype=self.dtype, name="norm1_context")(silu_t)
        sh, sc, g, sh2, sc2, g2 = (m[:, None, :] for m in jnp.split(mods, 6, axis=-1))
        csh, csc, cg, csh2, csc2, cg2 = (m[:, None, :] for m in jnp.split(cmods, 6, axis=-1))
        nx = _layer_norm(x) * (1 + sc) + sh
        nc = _layer_norm(c) * (1 + csc) + csh
        qx, kx, vx = QKV(self.heads, self.head_dim, "", self.dtype, name="attn")(nx)
        qc, kc, vc = QKV(self.heads, self.head_dim, "add", self.dtype, name="attn_added")(nc)
        q = apply_rope(jnp.concatenate([qc, qx], axis=1), cos, sin)
        k = apply_rope(jnp.concatenate([kc, kx], axis=1), cos, sin)
        v = jnp.concatenate([vc, vx], axis=1)
        out = _attention(q, k, v, self.dtype).reshape(x.shape[0], -1, d)
        n_c = c.shape[1]
        a_x = nn.Dense(d, dtype=self.dtype, name="to_out_0")(out[:, n_c:])
        a_c = nn.Dense(d, dtype=self.dtype, name="to_add_out")(out[:, :n_c])
        x = x + g * a_x
        x = x + g2 * FeedForward(d, self.dtype, name="ff")(_layer_norm(x) * (1 + sc2) + sh2)
        c = c + cg * a_c
        c = c + cg2 * FeedForward(d, self.dtype, name="ff_context")(_layer_norm(c) * (1 + csc2) + csh2)
        return x, c


class SingleBlock(nn.Module):
    """Single-stream block: attention and MLP in parallel on one modulated LayerNorm."""

    heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, cos, sin):
        d = self.heads * self.head_dim
        sh, sc, g = (m[:, None, :] for m in jnp.split(nn.Dense(3 * d, dtype=self.dtype, name="norm")(nn.silu(temb)), 3,
                                                         axis=-1))
        h = _layer_norm(x) * (1 + sc) + sh
        mlp = nn.gelu(nn.Dense(4 * d, dtype=self.dtype, name="proj_mlp")(h), approximate=True)
        q, k, v = QKV(self.heads, self.head_dim, "", self.dtype, name="attn")(h)
        attn = _attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.dtype).reshape(x.shape[0], -1, d)
        out = nn.Dense(d, dtype=self.dtype, name="proj_out")(jnp.concatenate([attn, mlp], axis=-1))
        return x + g * out


class MeissonicTransformer(nn.Module):
    """Meissonic `Transformer2DModel`; defaults are the released 1024-px model (1.007B).

    Call: `apply(params, tokens (B, H, W) int, encoder_hidden_states (B, T, joint_attention_dim),
    pooled_projections (B, pooled_projection_dim), micro_conds (B, 5), timestep (B,) or scalar)`
    -> logits (B, H, W, codebook_size) float32. MASK = vocab_size − 1.
    """

    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 14
    num_single_layers: int = 28
    attention_head_dim: int = 128
    num_attention_heads: int = 8
    joint_attention_dim: int = 1024
    pooled_projection_dim: int = 1024
    guidance_embeds: bool = False
    axes_dims_rope: Sequence[int] = (16, 56, 56)
    vocab_size: int = 8256
    codebook_size: int = 8192
    downsample: bool = True
    upsample: bool = True
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    def _check_config(self):
        if self.patch_size != 1:
            raise ValueError(f"patch_size {self.patch_size}: only 1 is implemented (Meissonic uses 1)")
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=True is not implemented (Meissonic's model does not use it)")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"sum(axes_dims_rope) {tuple(self.axes_dims_rope)} must equal attention_head_dim "
                             f"{self.attention_head_dim}")
        if self.pooled_projection_dim != self.inner_dim:
            raise ValueError(f"pooled_projection_dim {self.pooled_projection_dim} must equal the width "
                             f"{self.inner_dim} (cond_embed's output feeds the text embedder)")
        if self.downsample != self.upsample:
            raise ValueError("downsample and upsample must both be on or both off")

    def embedding_table(self):
        """(vocab_size, C) input embedding (rows ≥ codebook_size are MASK/unused)."""
        return self.variables["params"]["embed_embeddings"]["embedding"]

    @nn.compact
    def __call__(self, tokens=None, encoder_hidden_states=None, pooled_projections=None, micro_conds=None,
                 timestep=None, *, input_embeddings=None, img_ids=None, txt_ids=None,
                 noise_emb_perturb=0.0, perturb_noise=None, embedded=None, return_intermediates: bool = False):
        self._check_config()
        d, dt = self.inner_dim, self.dtype
        if sum(x is not None for x in (tokens, input_embeddings, embedded)) != 1:
            raise ValueError("pass exactly one of tokens (B, H, W), input_embeddings (B, H, W, C) or embedded "
                             "(B, H, W, C)")
        if encoder_hidden_states is None or pooled_projections is None or micro_conds is None or timestep is None:
            raise ValueError("Meissonic needs encoder_hidden_states, pooled_projections, micro_conds and timestep")
        if perturb_noise is None and not (isinstance(noise_emb_perturb, (int, float)) and noise_emb_perturb == 0):
            raise ValueError("noise_emb_perturb needs perturb_noise, the N(0, 1) draw of shape (B, H, W, C)")
        if embedded is not None:
            if embedded.ndim != 4 or embedded.shape[-1] != d:
                raise ValueError(f"embedded must be (B, H, W, {d}), got {embedded.shape}")
            h = jnp.asarray(embedded, dt)
        else:
            embed = nn.Embed(self.vocab_size, d, name="embed_embeddings")
            if tokens is not None:
                if tokens.ndim != 3:
                    raise ValueError(f"tokens must be (B, H, W) ids, got shape {tokens.shape}")
                e = embed(jnp.asarray(tokens, jnp.int32))
            else:
                if input_embeddings.ndim != 4 or input_embeddings.shape[-1] != d:
                    raise ValueError(f"input_embeddings must be (B, H, W, {d}), got {input_embeddings.shape}")
                e = input_embeddings
            h = RMSNorm(dt, name="embed_layer_norm")(e)
            h = nn.Dense(d, use_bias=False, dtype=dt, name="embed_conv")(h)  # 1x1 conv
            if perturb_noise is not None:
                # Di[M]O: h = p·ε + sqrt(1 − p²)·h; ε is the caller's N(0, 1) draw. A Python p takes
                # the coefficient in float64 like the original's np.sqrt; a traced p in float32.
                p = noise_emb_perturb
                coef = math.sqrt(1.0 - p * p) if isinstance(p, (int, float)) else jnp.sqrt(1.0 - p * p)
                h = (p * jnp.asarray(perturb_noise, jnp.float32) + coef * h.astype(jnp.float32)).astype(dt)
        b, hh, ww = h.shape[:3]
        if micro_conds.shape != (b, NUM_MICRO_CONDS):
            raise ValueError(f"micro_conds must be ({b}, {NUM_MICRO_CONDS}), got {micro_conds.shape}")
        if encoder_hidden_states.shape[-1] != self.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != "
                             f"joint_attention_dim {self.joint_attention_dim}")
        inter = {}
        # Conditioning vector.
        pooled = jnp.concatenate([jnp.asarray(pooled_projections, jnp.float32), micro_cond_embedding(micro_conds)],
                                 axis=-1)
        inter["pooled_with_micro"] = pooled
        cond = MLP2(d, False, dt, name="cond_embed")(pooled.astype(dt))
        inter["cond_embed"] = cond
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,)) * 1000.0
        temb = (MLP2(d, True, dt, name="timestep_embedder")(timestep_sinusoid(t).astype(dt))
                + MLP2(d, True, dt, name="text_embedder")(cond))
        inter["temb"] = temb
        inter["embed"] = h
        if self.downsample:
            if hh % 2 or ww % 2:
                raise ValueError(f"the token grid {hh}x{ww} must be even for the 2x2 down-sampling")
            h = RMSNorm(dt, name="down_norm")(h)
            h = nn.Conv(d, (2, 2), strides=(2, 2), padding="VALID", use_bias=False, dtype=dt, name="down_conv")(h)
        gh, gw = h.shape[1:3]
        inter["down_block"] = h
        x = h.reshape(b, gh * gw, d)
        x = nn.Dense(d, use_bias=False, dtype=dt, name="project_to_hidden")(RMSNorm(dt, name="project_to_hidden_norm")(x))
        inter["project_to_hidden"] = x
        c = nn.Dense(d, dtype=dt, name="context_embedder")(jnp.asarray(encoder_hidden_states, dt))
        c = RMSNorm(dt, name="encoder_proj_layer_norm")(c)
        inter["context"] = c
        n_txt = c.shape[1]
        txt = np.zeros((n_txt, 3), np.float32) if txt_ids is None else txt_ids
        img = image_ids(gh, gw) if img_ids is None else img_ids
        if img.shape[0] != gh * gw or txt.shape[0] != n_txt:
            raise ValueError(f"img_ids/txt_ids rows ({img.shape[0]}, {txt.shape[0]}) do not match the "
                             f"{gh}x{gw} grid and {n_txt} text tokens")
        ids = np.concatenate([np.asarray(txt), np.asarray(img)]) if isinstance(txt, np.ndarray) and isinstance(
            img, np.ndarray) else jnp.concatenate([jnp.asarray(txt, jnp.float32), jnp.asarray(img, jnp.float32)])
        cos, sin = rope_tables(ids, self.axes_dims_rope)
        inter["rope_cos"], inter["rope_sin"] = cos, sin
        hd, nh = self.attention_head_dim, self.num_attention_heads
        dual = nn.remat(DualBlock) if self.remat else DualBlock
        single = nn.remat(SingleBlock) if self.remat else SingleBlock
        for i in range(self.num_layers):
            x, c = dual(nh, hd, dt, name=f"transformer_blocks_{i}")(x, c, temb, cos, sin)
            inter[f"dual_{i}_context"], inter[f"dual_{i}_hidden"] = c, x
        s = jnp.concatenate([c, x], axis=1)
        for i in range(self.num_single_layers):
            s = single(nh, hd, dt, name=f"single_transformer_blocks_{i}")(s, temb, cos, sin)
            inter[f"single_{i}"] = s
        x = s[:, n_txt:]
        x = nn.Dense(d, use_bias=False, dtype=dt, name="project_from_hidden")(
            RMSNorm(dt, name="project_from_hidden_norm")(x))
        h = x.reshape(b, gh, gw, d)
        inter["up_block_in"] = h
        if self.upsample:
            h = RMSNorm(dt, name="up_norm")(h)
            kernel = self.param("up_conv", nn.initializers.lecun_normal(), (2, 2, d, d))  # (kh, kw, in, out)
            h = jnp.einsum("bijc,klco->bikjlo", h, kernel.astype(dt)).reshape(b, 2 * gh, 2 * gw, d)
        inter["up_block"] = h
        h = nn.Dense(d, use_bias=False, dtype=dt, name="mlm_conv1")(h)
        h = RMSNorm(dt, name="mlm_layer_norm")(h)
        logits = nn.Dense(self.codebook_size, use_bias=False, dtype=dt, name="mlm_conv2")(h).astype(jnp.float32)
        if return_intermediates:
            return logits, inter
        return logits

    def embed_block(self, tokens=None, input_embeddings=None):
        """The embedding block's output (B, H, W, C): ids (or soft p @ E) -> RMSNorm -> 1x1 conv,
        the same ops as `__call__` (read from the params). This is what Di[M]O perturbs and what
        `embedded=` takes."""
        if (tokens is None) == (input_embeddings is None):
            raise ValueError("pass exactly one of tokens (B, H, W) or input_embeddings (B, H, W, C)")
        p, dt = self.variables["params"], self.dtype
        e = (jnp.take(p["embed_embeddings"]["embedding"], jnp.asarray(tokens, jnp.int32), axis=0)
             if tokens is not None else input_embeddings)
        h = rms_norm(e, p["embed_layer_norm"]["scale"]).astype(dt)
        kernel = p["embed_conv"]["kernel"].astype(dt)
        return jax.lax.dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ())))

    def embed_probs(self, probs):
        """Soft tokens p @ E (B, H, W, C), before the embedding RMSNorm; probs over the
        codebook_size codes or the whole vocabulary."""
        n = probs.shape[-1]
        if n not in (self.codebook_size, self.vocab_size):
            raise ValueError(f"probs have {n} classes; expected {self.codebook_size} codes or the "
                             f"{self.vocab_size}-row vocabulary")
        table = self.embedding_table()[:n]
        return jnp.einsum("...k,kd->...d", probs.astype(jnp.float32), table.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)


def embedding_table(params, codebook_size: int | None = None):
    """The input embedding rows from a params tree, (vocab_size or codebook_size, C): E for
    teacher-side soft tokens p @ E (drop the MASK/unused rows by passing codebook_size)."""
    table = params["embed_embeddings"]["embedding"]
    return table if codebook_size is None else table[:codebook_size]


def _get(cfg, key, default=None):
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


TRANSFORMER_FIELDS = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                      "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
                      "axes_dims_rope", "vocab_size", "codebook_size", "downsample", "upsample")


def meissonic_transformer_from_cfg(cfg: Mapping[str, Any], **overrides) -> MeissonicTransformer:
    """From the original's constructor arguments / config.json (a fixture's `cfg.config`)."""
    cfg = _get(cfg, "config", cfg)
    kwargs = {f: _get(cfg, f) for f in TRANSFORMER_FIELDS if _get(cfg, f) is not None}
    if "axes_dims_rope" in kwargs:
        kwargs["axes_dims_rope"] = tuple(int(a) for a in kwargs["axes_dims_rope"])
    kwargs.update(overrides)
    return MeissonicTransformer(**kwargs)


def transformer_expected_params(model: MeissonicTransformer) -> Any:
    """Param shapes of `model` (jax.eval_shape; nothing is allocated)."""
    g = 2 if model.downsample else 1
    args = (jnp.zeros((1, g, g), jnp.int32), jnp.zeros((1, 1, model.joint_attention_dim)),
            jnp.zeros((1, model.pooled_projection_dim)), jnp.zeros((1, NUM_MICRO_CONDS)), jnp.zeros((1,)))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))["params"]
