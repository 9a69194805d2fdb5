"""The text-to-image reward pipeline (configs/maskgen_t2i_reward.py, pipelines/t2i.py) on tiny
converted checkpoints: distill, then reward fine-tuning + TTEO in the same workdir."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

from helpers import fast_compiles
from softdimo_jax.models.clip import CLIP
from softdimo_jax.models.clip_text import ClipTextTransformer
from softdimo_jax.models.maskgen import MaskGenVQ
from softdimo_jax.models.tatitok import TATiTok
from softdimo_jax.pipelines import at_scale, t2i
from softdimo_jax.runtime.converted import load_converted, save_converted

T, TW, K, L = 8, 16, 16, 8


def _save_models(tmp_path):
    m = MaskGenVQ(codebook_size=K, seq_len=L, embed_dim=32, depth=1, num_heads=2, text_embed_dim=TW,
                  micro_condition=True, micro_condition_embed_dim=8, condition_num_classes=2)
    mp = m.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32), jnp.zeros((1, T, TW)), jnp.zeros((1, 1, TW)),
                jnp.full((1,), 6.5))["params"]
    clip = ClipTextTransformer(context_length=T, width=TW, heads=2, layers=1, embed_dim=TW)
    cp = clip.init(jax.random.PRNGKey(1), jnp.zeros((1, T), jnp.int32))["params"]
    tok = TATiTok(image_size=16, enc_patch_size=8, dec_patch_size=8, enc_width=16, enc_layers=1, enc_heads=2,
                  dec_width=16, dec_layers=1, dec_heads=2, num_latent_tokens=L, token_size=4, codebook_size=K,
                  text_context_length=T, text_embed_dim=TW)
    tp = tok.init(jax.random.PRNGKey(2), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, T, TW)))["params"]
    hps = CLIP(embed_dim=8, image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
               context_length=77, text_width=16, text_heads=2, text_layers=1)
    hp = hps.init(jax.random.PRNGKey(3), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 77), jnp.int32))["params"]
    for name, fam, model, params in (("teacher", "maskgen_vq", m, mp), ("clip", "clip_text", clip, cp),
                                     ("tok", "tatitok", tok, tp), ("hps", "openclip", hps, hp)):
        save_converted(str(tmp_path / name), fam, model, params)


def _config(tmp_path):
    spec = importlib.util.spec_from_file_location("cfg", "configs/maskgen_t2i_reward.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("1")
    c.unlock()
    c.update(dict(teacher_checkpoint=str(tmp_path / "teacher"), text_encoder_checkpoint=str(tmp_path / "clip"),
                  tokenizer_checkpoint=str(tmp_path / "tok"), prompt_file=str(tmp_path / "prompts.txt"),
                  prompt_encode_chunk=4, grid_samples=4))
    c.distill.update(dict(num_steps=2, batch_size=4, compute_dtype="float32", remat=False, num_devices=1,
                          lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=2))
    c.reward.update(dict(num_steps=2, batch_size=4, gen_warmup_steps=1, log_every=1, ckpt_every=2))
    c.tteo.steps = 1
    return c


@fast_compiles()  # the Trainer's steps too
def test_distill_then_t2i_reward_and_tteo(tmp_path, capsys):
    _save_models(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red cube\ntwo dogs on a beach\na bowl of soup\n")
    config = _config(tmp_path)
    work = str(tmp_path / "work")
    with pytest.raises(ValueError, match="every weight of config.reward.rewards is 0"):
        t2i.t2i_reward(config, work)
    at_scale.distill(config, work)
    config.reward.rewards.hps_v2 = 1.0
    with pytest.raises(ValueError, match="needs its converted model"):
        t2i.t2i_reward(config, work)
    config.reward_checkpoints.hps_v2 = str(tmp_path / "hps")
    t2i.t2i_reward(config, work)
    assert os.listdir(os.path.join(work, "reward", "checkpoints")) == ["2"]
    for grid in ("student_hard.png", "tteo_k1.png"):
        assert os.path.getsize(os.path.join(work, "reward", grid)) > 0
    student, _ = load_converted(os.path.join(work, "reward", "student"))
    assert isinstance(student, MaskGenVQ)
    lines = [l for l in capsys.readouterr().err.splitlines() if "[reward] tteo_k1: " in l]
    stats = json.loads(lines[-1].split("tteo_k1: ", 1)[1])
    assert stats["steps"] == 1 and stats["forward"] == 2 and stats["backward"] == 1
    assert all(map(lambda k: abs(stats[k]) < 10, ("soft_reward_before", "soft_reward_after")))
