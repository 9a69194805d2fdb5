"""The at-scale pipelines of `python -m softdimo_jax.main` on tiny converted MaskBit
checkpoints: distill, then reward fine-tuning from the distilled state in the same workdir."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from helpers import fast_compiles
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.models.maskbit_tokenizer import ConvVQModel
from softdimo_jax.pipelines import at_scale
from softdimo_jax.runtime.converted import load_converted, save_converted


def _config(tmp_path):
    spec = importlib.util.spec_from_file_location("cfg", "configs/maskbit_imagenet256_reward.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.unlock()
    c.update(dict(teacher_checkpoint=str(tmp_path / "gen"), tokenizer_checkpoint=str(tmp_path / "tok"),
                  grid_samples=4, grid_labels=(1, 2, 3, 4)))
    c.data.image_size = 16
    c.distill.update(dict(num_steps=2, batch_size=4, compute_dtype="float32", remat=False, num_devices=1,
                          warmup_steps=1, log_every=1, ckpt_every=2))
    c.reward.update(dict(source="distill", num_steps=2, batch_size=4, gen_warmup_steps=1, log_every=1,
                         ckpt_every=2))
    return c


@fast_compiles()  # the Trainer's steps too
def test_distill_then_reward_in_one_workdir(tmp_path):
    gen = LFQBert(num_tokens=16, num_bits=6, splits=2, hidden_dim=32, depth=1, heads=2, mlp_dim=64,
                  num_classes=10, dropout=0.0)
    tok = ConvVQModel(num_bits=6, hidden_channels=32, channel_mult=(1, 1, 1), num_res_blocks=1, num_channels=1)
    gp = gen.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 2), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]
    tp = tok.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 1)))["params"]
    save_converted(str(tmp_path / "gen"), "maskbit_generator", gen, gp)
    save_converted(str(tmp_path / "tok"), "maskbit_tokenizer", tok, tp)
    config = _config(tmp_path)
    work = str(tmp_path / "work")

    with pytest.raises(ValueError, match="every weight of config.reward.rewards is 0"):
        at_scale.reward(config, work)
    at_scale.distill(config, work)
    assert os.listdir(os.path.join(work, "distill", "checkpoints")) == ["2"]

    config.reward.rewards.brightness = 1.0
    at_scale.reward(config, work)
    assert os.listdir(os.path.join(work, "reward", "checkpoints")) == ["2"]
    assert os.path.getsize(os.path.join(work, "reward", "student_hard.png")) > 0
    # The report of an at-scale workdir: its one-step grids (distill hard / soft, reward),
    # three panels of 2x2 grids of 16 px images (38 px) under 56 px titles.
    from PIL import Image

    with Image.open(os.path.join(work, "summary.png")) as im:
        assert im.size == (3 * 38, 38 + 56)
    model, params = load_converted(os.path.join(work, "reward", "student"))
    assert model.num_bits == 6 and params["pos_emb"].shape == gp["pos_emb"].shape

    config.reward.source = "teacher"
    with pytest.raises(ValueError, match="reward.source must be 'gan' or 'distill'"):
        at_scale.reward(config, work)
