"""MaskBit's released ImageNet-256 models (10/12/14/16/18 bits) as ml_collections configs.

    --config=configs/maskbit.py:14          (preset by bits; default 14)
    --config=configs/maskbit.py:tiny        (a small CPU-test size)
    --config.generator.dtype=bfloat16 --config.generator.remat=True   (overrides)

`config.generator` and `config.tokenizer` use our module field names; build the modules
with `softdimo_jax.models.maskbit_bert.maskbit_bert_from_config(config.generator)` and
`softdimo_jax.models.maskbit_tokenizer.maskbit_tokenizer_from_config(config.tokenizer)`.
`config.sampling` holds each checkpoint's released sampling settings (MaskBit's
configs/generator/maskbit_generator_<bits>bit.yaml).
"""

from __future__ import annotations

import ml_collections

BITS = (10, 12, 14, 16, 18)

# Released per-bits sampling settings: guidance scale, Gumbel-noise temperature, CFG power.
_SAMPLING = {
    10: dict(guidance_scale=6.4, randomize_temperature=10.5, scale_pow=2.5),
    12: dict(guidance_scale=7.1, randomize_temperature=8.2, scale_pow=3.0),
    14: dict(guidance_scale=7.1, randomize_temperature=7.8, scale_pow=3.0),
    16: dict(guidance_scale=6.5, randomize_temperature=7.5, scale_pow=2.5),
    18: dict(guidance_scale=5.7, randomize_temperature=8.5, scale_pow=2.5),
}


def generator_config(bits: int = 14) -> ml_collections.ConfigDict:
    """LFQBert at MaskBit's released size (~305M parameters at 14 bits)."""
    return ml_collections.ConfigDict(
        dict(
            num_tokens=256,  # 16 x 16 tokens of a 256 x 256 image (stride 16)
            num_bits=bits,
            splits=2,
            hidden_dim=1024,
            depth=24,
            heads=16,
            mlp_dim=4096,
            num_classes=1000,
            dropout=0.1,
            use_prenorm=False,
            dtype="float32",  # compute dtype; params stay float32
            remat=False,
        )
    )


def tokenizer_config(bits: int = 14) -> ml_collections.ConfigDict:
    """ConvVQModel (lookup-free) at MaskBit's released size (~55M parameters)."""
    return ml_collections.ConfigDict(
        dict(
            num_bits=bits,
            hidden_channels=128,
            channel_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            num_channels=3,
            sample_with_conv=True,
            dtype="float32",
            # LFQ training losses (lfq_losses) as released.
            commitment_cost=0.25,
            entropy_loss_weight=0.02,
            entropy_loss_temperature=0.01,
            entropy_gamma=1.0,
        )
    )


def sampling_config(bits: int = 14) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            num_steps=64,
            guidance_annealing="cosine",
            mask_schedule="arccos",
            softmax_temperature=1.0,
            use_sampling_annealing=False,
            **_SAMPLING[bits],
        )
    )


def _parse(arg) -> int | str:
    text = str(arg or "14").strip().lower().removesuffix("bit").removesuffix("bits")
    if text == "tiny":
        return "tiny"
    try:
        bits = int(text)
    except ValueError:
        raise ValueError(f"configs/maskbit.py: unknown preset {arg!r}; use one of {BITS} or 'tiny'") from None
    if bits not in BITS:
        raise ValueError(f"configs/maskbit.py: MaskBit was released with {BITS} bits, not {bits}")
    return bits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = _parse(arg)
    bits = 14 if preset == "tiny" else preset
    config = ml_collections.ConfigDict()
    config.bits = bits
    config.image_size = 256
    config.generator = generator_config(bits)
    config.tokenizer = tokenizer_config(bits)
    config.sampling = sampling_config(bits)
    if preset == "tiny":  # CPU-test size: 4x4 tokens of 6 bits, 16x16 images (tokenizer stride 4).
        config.bits = 6
        config.image_size = 16
        config.generator.update(num_tokens=16, num_bits=6, hidden_dim=64, depth=2, heads=4,
                                mlp_dim=128, num_classes=10, dropout=0.0)
        config.tokenizer.update(num_bits=6, hidden_channels=32, channel_mult=(1, 1, 2))
        config.sampling.num_steps = 4
    return config
