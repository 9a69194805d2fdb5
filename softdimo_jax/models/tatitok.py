"""TA-TiTok (VQ): the text-aware 1-D image tokenizer of MaskGen, as a Flax linen module.

Parameter-compatible with the PyTorch original (`TATiTok`, non-legacy layout; see
`softdimo_jax.conversion.maskgen.convert_tatitok`). Images at this API are NHWC float32 in
[0, 1], for the encoder input and the decoder output alike; the decoder does not clamp
(clip to [0, 1] for display, as the original's demo does).

- Encoder (ViT): patch conv -> [cls, patches] + positions, ++ learned latent tokens +
  their positions -> ln_pre -> blocks -> ln_post over the latent positions -> 1×1 conv
  (Dense) to token_size = the codebook dimension C.
- Quantizer: nearest codebook row by squared distance (optionally on l2-normalised vectors).
- Decoder (text-guided ViT): sequence [cls, grid² mask tokens] + positions, then
  [decoder_embed(latents) + latent positions], then [text_guidance_proj(text) + 77 text
  positions]; one ln_pre; blocks (exact GELU, LayerNorm eps 1e-5); keep positions
  1..grid²; ln_post; 1×1 conv to p²·3 channels; pixel shuffle (channel order p1, p2, c);
  3×3 conv.

Latents are (B, L, C) here (the original's (B, C, 1, L)); `decode_soft(probs)` decodes the
continuous codebook-space latent probs @ codebook (the decoder-side soft embedding).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from softdimo_jax.models.clip_text import ResidualAttentionBlock, layer_norm

# The original's ViT size table (width, layers, heads).
VIT_SIZES = {
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
_LN_EPS = 1e-5


def _blocks(prefix, width, layers, heads, remat, dtype):
    cls = nn.remat(ResidualAttentionBlock) if remat else ResidualAttentionBlock
    return [cls(width, heads, 4.0, "gelu", False, _LN_EPS, dtype, name=f"{prefix}_{i}") for i in range(layers)]


class TiTokEncoder(nn.Module):
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    num_latent_tokens: int
    token_size: int
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def setup(self):
        w, g2 = self.width, self.grid_size ** 2
        scale = w ** -0.5
        init = lambda shape: (lambda key, s=shape: scale * jax.random.normal(key, s))
        p = self.patch_size
        self.patch_embed = nn.Conv(w, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed")
        self.class_embedding = self.param("class_embedding", init((1, w)))
        self.positional_embedding = self.param("positional_embedding", init((g2 + 1, w)))
        self.latent_token_positional_embedding = self.param(
            "latent_token_positional_embedding", init((self.num_latent_tokens, w))
        )
        self.ln_pre = layer_norm("ln_pre", _LN_EPS, self.dtype)
        self.transformer = _blocks("transformer", w, self.layers, self.heads, self.remat, self.dtype)
        self.ln_post = layer_norm("ln_post", _LN_EPS, self.dtype)
        self.conv_out = nn.Dense(self.token_size, dtype=self.dtype, name="conv_out")

    def __call__(self, images, latent_tokens):
        b, h, w_, c = images.shape
        if (h, w_, c) != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"images must be (B, {self.image_size}, {self.image_size}, 3) NHWC in [0, 1], got {images.shape}"
            )
        x = self.patch_embed(images.astype(self.dtype)).reshape(b, -1, self.width)
        cls = jnp.broadcast_to(self.class_embedding[None], (b, 1, self.width)).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding
        lat = jnp.broadcast_to(latent_tokens[None], (b,) + latent_tokens.shape)
        lat = lat + self.latent_token_positional_embedding
        x = self.ln_pre(jnp.concatenate([x, lat.astype(x.dtype)], axis=1).astype(self.dtype))
        for blk in self.transformer:
            x = blk(x)
        lat = self.ln_post(x[:, 1 + self.grid_size ** 2:])
        return self.conv_out(lat).astype(jnp.float32)  # (B, L, C)


class TATiTokDecoder(nn.Module):
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    num_latent_tokens: int
    token_size: int
    text_context_length: int = 77
    text_embed_dim: int = 768
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def setup(self):
        w, g2 = self.width, self.grid_size ** 2
        scale = w ** -0.5
        init = lambda shape: (lambda key, s=shape: scale * jax.random.normal(key, s))
        self.decoder_embed = nn.Dense(w, dtype=self.dtype, name="decoder_embed")
        self.class_embedding = self.param("class_embedding", init((1, w)))
        self.positional_embedding = self.param("positional_embedding", init((g2 + 1, w)))
        self.mask_token = self.param("mask_token", init((1, 1, w)))
        self.latent_token_positional_embedding = self.param(
            "latent_token_positional_embedding", init((self.num_latent_tokens, w))
        )
        self.text_guidance_proj = nn.Dense(w, dtype=self.dtype, name="text_guidance_proj")
        self.text_guidance_positional_embedding = self.param(
            "text_guidance_positional_embedding", init((self.text_context_length, w))
        )
        self.ln_pre = layer_norm("ln_pre", _LN_EPS, self.dtype)
        self.transformer = _blocks("transformer", w, self.layers, self.heads, self.remat, self.dtype)
        self.ln_post = layer_norm("ln_post", _LN_EPS, self.dtype)
        p = self.patch_size
        self.ffn = nn.Dense(p * p * 3, dtype=self.dtype, name="ffn")  # the 1×1 conv
        self.conv_out = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv_out")

    def __call__(self, latents, text_guidance):
        b, n, c = latents.shape
        if n > self.num_latent_tokens or c != self.token_size:
            raise ValueError(
                f"latents must be (B, <= {self.num_latent_tokens}, {self.token_size}), got {latents.shape}"
            )
        if text_guidance.shape[1:] != (self.text_context_length, self.text_embed_dim):
            raise ValueError(
                f"text_guidance must be (B, {self.text_context_length}, {self.text_embed_dim}) "
                f"(OpenCLIP final-LN tokens), got {text_guidance.shape}"
            )
        w, g = self.width, self.grid_size
        x = self.decoder_embed(latents.astype(self.dtype)) + self.latent_token_positional_embedding[:n]
        masks = jnp.broadcast_to(self.mask_token, (b, g * g, w))
        cls = jnp.broadcast_to(self.class_embedding[None], (b, 1, w))
        queries = jnp.concatenate([cls, masks], axis=1) + self.positional_embedding
        text = self.text_guidance_proj(text_guidance.astype(self.dtype)) + self.text_guidance_positional_embedding
        x = jnp.concatenate([queries.astype(self.dtype), x.astype(self.dtype), text.astype(self.dtype)], axis=1)
        x = self.ln_pre(x)
        for blk in self.transformer:
            x = blk(x)
        x = self.ln_post(x[:, 1:1 + g * g]).reshape(b, g, g, w)
        p = self.patch_size
        x = self.ffn(x).reshape(b, g, g, p, p, 3)  # channel order (p1, p2, c)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, 3)
        return self.conv_out(x).astype(jnp.float32)


class TATiTok(nn.Module):
    """TA-TiTok (VQ). Build with `tatitok_from_cfg`. `apply(params, images, text_guidance)`
    reconstructs (encode -> quantise -> decode) and returns (images, aux dict)."""

    image_size: int = 256
    enc_patch_size: int = 16
    dec_patch_size: int = 16
    enc_width: int = 768
    enc_layers: int = 12
    enc_heads: int = 12
    dec_width: int = 1024
    dec_layers: int = 24
    dec_heads: int = 16
    num_latent_tokens: int = 128
    token_size: int = 64
    codebook_size: int = 8192
    use_l2_norm: bool = False
    text_context_length: int = 77
    text_embed_dim: int = 768
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        scale = self.enc_width ** -0.5
        self.latent_tokens = self.param(
            "latent_tokens", lambda k, s: scale * jax.random.normal(k, s), (self.num_latent_tokens, self.enc_width)
        )
        self.encoder = TiTokEncoder(
            self.image_size, self.enc_patch_size, self.enc_width, self.enc_layers, self.enc_heads,
            self.num_latent_tokens, self.token_size, self.dtype, self.remat, name="encoder",
        )
        self.decoder = TATiTokDecoder(
            self.image_size, self.dec_patch_size, self.dec_width, self.dec_layers, self.dec_heads,
            self.num_latent_tokens, self.token_size, self.text_context_length, self.text_embed_dim,
            self.dtype, self.remat, name="decoder",
        )
        self.quantize = VectorQuantizerCodebook(self.codebook_size, self.token_size, name="quantize")

    def codebook(self):
        """(K, C) codebook as used for lookups (l2-normalised when use_l2_norm)."""
        e = self.quantize.embedding
        return _l2n(e) if self.use_l2_norm else e

    def encode(self, images):
        """NHWC [0, 1] images -> dict(encoder_z (B, L, C), indices (B, L) int32, z_quantized (B, L, C))."""
        z = self.encoder(images, self.latent_tokens)
        zn = _l2n(z) if self.use_l2_norm else z
        e = self.codebook()
        d = (jnp.sum(zn ** 2, axis=-1, keepdims=True) + jnp.sum(e ** 2, axis=-1)
             - 2 * jnp.einsum("bld,kd->blk", zn, e))
        idx = jnp.argmin(d, axis=-1).astype(jnp.int32)
        zq = e[idx]
        # The original returns z + sg(zq − z): the same values up to round-off.
        return {"encoder_z": z, "indices": idx, "z_quantized": zn + jax.lax.stop_gradient(zq - zn)}

    def decode(self, latents, text_guidance):
        """(B, L, C) latents + (B, 77, TW) text guidance -> NHWC images (not clamped)."""
        return self.decoder(latents, text_guidance)

    def lookup(self, ids):
        return self.codebook()[jnp.asarray(ids, jnp.int32)]

    def soft_latents(self, probs):
        """(B, L, K) probabilities -> probs @ codebook, (B, L, C)."""
        if probs.shape[-1] != self.codebook_size:
            raise ValueError(f"probs have {probs.shape[-1]} classes, the codebook {self.codebook_size}")
        return jnp.einsum("blk,kc->blc", probs.astype(jnp.float32), self.codebook())

    def decode_tokens(self, ids, text_guidance):
        """(B, L) (or (B, 1, L)) token ids -> NHWC images."""
        ids = jnp.asarray(ids, jnp.int32)
        if ids.ndim == 3:
            ids = ids[:, 0]
        return self.decode(self.lookup(ids), text_guidance)

    def decode_soft(self, probs, text_guidance):
        """Decoder-side soft embedding: decode(probs @ codebook)."""
        return self.decode(self.soft_latents(probs), text_guidance)

    def __call__(self, images, text_guidance):
        enc = self.encode(images)
        return self.decode(enc["z_quantized"], text_guidance), enc


class VectorQuantizerCodebook(nn.Module):
    codebook_size: int
    token_size: int

    def setup(self):
        k = self.codebook_size
        self.embedding = self.param(
            "embedding", lambda key, s: jax.random.uniform(key, s, minval=-1.0 / k, maxval=1.0 / k),
            (self.codebook_size, self.token_size),
        )


def _l2n(x, eps: float = 1e-12):
    # torch.nn.functional.normalize: x / max(||x||, eps)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def vit_size(name: str, cfg: Mapping[str, Any] | None = None, role: str = "") -> tuple[int, int, int]:
    """(width, layers, heads) for a ViT size name: the original's table, or an entry of the
    config's `fixture_sizes` (by full name, or "fixture_<key>" -> key)."""
    if name in VIT_SIZES:
        return VIT_SIZES[name]
    table = _get(cfg, "fixture_sizes") or {}
    key = name if name in table else (name[len("fixture_"):] if name.startswith("fixture_") else None)
    if key is not None and key in table:
        e = table[key]
        return int(e["width"]), int(e["layers"]), int(e["heads"])
    raise ValueError(
        f"unknown ViT {role} size {name!r}; known: {sorted(VIT_SIZES)} (or give its width/layers/heads "
        "in the config's fixture_sizes)"
    )


def tatitok_from_cfg(cfg: Mapping[str, Any], **overrides) -> TATiTok:
    """Builds TA-TiTok from the original's config tree (`model.vq_model`,
    `dataset.preprocessing.crop_size`), e.g. configs/infer/TA-TiTok/tatitok_bl128_vq.yaml."""
    vq = _get(_get(cfg, "model"), "vq_model")
    if vq is None:
        raise ValueError("TA-TiTok config needs a model.vq_model section")
    mode = _get(vq, "quantize_mode", "vq")
    if mode != "vq":
        raise NotImplementedError(f"TA-TiTok quantize_mode {mode!r}: only the VQ tokenizer is ported")
    if _get(vq, "is_legacy", True):
        raise NotImplementedError("legacy TiTok layout (is_legacy: True) is not ported; TA-TiTok uses is_legacy: False")
    if _get(vq, "finetune_decoder", True):
        raise NotImplementedError("finetune_decoder (MaskGIT pixel decoder stage) is not ported; TA-TiTok uses False")
    crop = int(_get(_get(_get(cfg, "dataset"), "preprocessing"), "crop_size", 256))
    ew, el, eh = vit_size(str(_get(vq, "vit_enc_model_size")), cfg, "encoder")
    dw, dl, dh = vit_size(str(_get(vq, "vit_dec_model_size")), cfg, "decoder")
    kwargs = dict(
        image_size=crop,
        enc_patch_size=int(_get(vq, "vit_enc_patch_size")),
        dec_patch_size=int(_get(vq, "vit_dec_patch_size")),
        enc_width=ew, enc_layers=el, enc_heads=eh,
        dec_width=dw, dec_layers=dl, dec_heads=dh,
        num_latent_tokens=int(_get(vq, "num_latent_tokens")),
        token_size=int(_get(vq, "token_size")),
        codebook_size=int(_get(vq, "codebook_size")),
        use_l2_norm=bool(_get(vq, "use_l2_norm", False)),
        text_context_length=int(_get(vq, "text_context_length", 77)),
        text_embed_dim=int(_get(vq, "text_embed_dim", 768)),
    )
    kwargs.update(overrides)
    return TATiTok(**kwargs)
