"""Training a MaskBit teacher (LFQBert, 14 bits) on ImageNet 256 from scratch (not run here).

    python -m softdimo_jax.convert --model maskbit_tokenizer --bits 14 maskbit_tokenizer_14bit.bin ckpt/tok14
    python -m softdimo_jax.main --config=configs/maskbit_imagenet256_teacher.py \\
        --workdir=gs://BUCKET/maskbit14_teacher --config.tokenizer_checkpoint=gs://BUCKET/ckpt/tok14 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

The objective and optimiser are MaskBit's released ones (configs/generator/
maskbit_generator_14bit.yaml): arccos masking per split, CE over all positions with label
smoothing 0.1, class dropout 0.1, AdamW(0.9, 0.96, eps 1e-8) lr 1e-4, weight decay 0.045,
5,000 warm-up steps then cosine, grad clip 1.0, EMA, 1.35M steps. MaskBit trains at 32 per GPU;
the global batch here is a config key (scale the learning rate if you change it a lot).
Differences: MaskBit uses a random-resized crop (min scale 0.8) as augmentation, we use the
center crop of `softdimo_jax.data.tfds_images`; images are tokenized inside the jitted step by
the frozen tokenizer (passed as a non-donated, sharded argument).
"""

from __future__ import annotations

import ml_collections

from softdimo_jax.core.defaults import default_teacher_train_config

from configs.maskbit import generator_config, tokenizer_config


def get_config(bits: str = "14") -> ml_collections.ConfigDict:
    bits = int(bits or 14)
    c = ml_collections.ConfigDict()
    c.pipeline = "teacher"  # the softdimo_jax.pipelines entry that python -m softdimo_jax.main runs
    c.seed = 42
    c.tokenizer_checkpoint = ""  # a `softdimo_jax.convert` directory (frozen tokenizer)
    c.tokenizer = tokenizer_config(bits)
    c.data = dict(name="imagenet2012", split="train", data_dir="", image_size=256)
    c.mesh = dict(num_devices=0, fsdp=1)
    c.checkpoint = dict(keep=3)
    c.teacher = ml_collections.ConfigDict()
    model = generator_config(bits)
    model.dtype = "bfloat16"  # compute dtype; params and optimiser state stay float32
    model.remat = True
    c.teacher.model = model
    c.teacher.train = default_teacher_train_config()  # MaskBit's ImageNet recipe
    c.lock()
    return c
