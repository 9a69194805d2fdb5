"""Text-to-image rewards (core/t2i_reward.py): CLIP score / HPS v2 / PickScore as pure
rewards with finite-difference-checked image gradients, reward fine-tuning of a tiny MaskGen
on the 8-device mesh, TTEO for text-to-image, and one-line errors for bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softdimo_jax.core import adapters, reward as rewards, t2i_reward
from softdimo_jax.core.defaults import default_distill_config, default_reward_config
from softdimo_jax.data import prompts
from softdimo_jax.data.clip_bpe import ClipBPETokenizer
from softdimo_jax.models.clip import CLIP, HFCLIPModel
from softdimo_jax.models.clip_text import ClipTextTransformer
from softdimo_jax.models.maskgen import MaskGenVQ
from softdimo_jax.models.tatitok import TATiTok
from softdimo_jax.runtime.mesh import make_mesh
from softdimo_jax.runtime.trainer import Trainer
from softdimo_jax.sampling.maskgen_sampler import maskgen_one_step
from softdimo_jax.sampling.t2i_tteo import make_t2i_tteo_sampler

from helpers import FAST, HashTokenizer
B, K, L, T, TW = 8, 16, 8, 6, 16
CAPTIONS = ["a red cube", "two dogs on a beach", "a bowl of soup", "snowy mountain at dawn"]


def _tiny_clip(cls=CLIP, seed=0):
    m = cls(embed_dim=8, image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
            vocab_size=49408, context_length=77, text_width=16, text_heads=2, text_layers=1)
    p = jax.jit(m.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 77), jnp.int32))["params"]
    return m, p


_JIT = jax.jit  # the unpatched jit (grad of a jit with compiler options is refused)


@pytest.fixture(scope="module")
def fast_jit():
    # Compile time dominates these tiny steps: every jit of this module at XLA -O0.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=FAST))
        yield


@pytest.fixture(scope="module")
def bpe():
    return ClipBPETokenizer()


@pytest.fixture(scope="module")
def reward_models():
    return {"clip_score": _tiny_clip(seed=1), "hps_v2": _tiny_clip(seed=2), "pickscore": _tiny_clip(HFCLIPModel, seed=3)}


@pytest.mark.parametrize("name", ["clip_score", "hps_v2", "pickscore"])
def test_reward_values_and_gradient_match_finite_differences(name, reward_models, bpe):
    rset = rewards.build_reward_set({name: 1.0}, t2i_reward_models=reward_models, prompt_tokenizer=bpe)
    model, params = reward_models[name]
    feats = t2i_reward.prompt_reward_inputs(rset, CAPTIONS[:2])[name]
    assert feats.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)
    cond = {"reward_text": {name: jnp.asarray(feats)}}
    # images of another size than the tower's (20×28 → resize + crop), away from the [0, 1] clip
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 20, 28, 3), minval=0.2, maxval=0.8)
    with jax.default_matmul_precision("highest"):
        f = _JIT(lambda x: rset.total(rset.params, x, cond)[0])
        r = f(x)
        # the reward is the original's score of the preprocessed image
        crop = "floor" if name == "pickscore" else "torchvision"
        img = t2i_reward.image_features(model, params["visual"], x, crop=crop)
        cos = np.sum(np.asarray(img / np.linalg.norm(img, axis=-1, keepdims=True)) * feats, -1)
        want = cos * (np.exp(float(params["logit_scale"])) if name == "pickscore" else 1.0)
        np.testing.assert_allclose(r, want, rtol=1e-5, atol=1e-6)
        g = jax.grad(lambda x: jnp.sum(f(x)))(x)  # f is jitted
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
        v = jax.random.normal(jax.random.PRNGKey(1), x.shape)
        cd = lambda h: (float(jnp.sum(f(x + h * v))) - float(jnp.sum(f(x - h * v)))) / (2 * h)
        fd = (4 * cd(5e-3) - cd(1e-2)) / 3  # Richardson: cancels the h² error of central differences
        np.testing.assert_allclose(float(jnp.vdot(g, v)), fd, rtol=1e-2, atol=1e-4)


def test_bad_inputs_are_one_line_errors(reward_models, bpe):
    rset = rewards.build_reward_set({"hps_v2": 1.0}, t2i_reward_models=reward_models, prompt_tokenizer=bpe)
    long = " ".join(["word"] * 90)
    with pytest.raises(ValueError, match="more than the reward model's context of 77") as e:
        t2i_reward.prompt_reward_inputs(rset, ["ok", long])
    assert "\n" not in str(e.value) and "truncate_prompts" in str(e.value)
    trunc = rewards.build_reward_set({"hps_v2": {"weight": 1.0, "truncate_prompts": True}},
                                     t2i_reward_models=reward_models, prompt_tokenizer=bpe)
    assert t2i_reward.prompt_reward_inputs(trunc, [long])["hps_v2"].shape == (1, 8)
    with pytest.raises(ValueError, match="needs its converted model") as e:
        rewards.build_reward("pickscore", t2i_reward_models={"hps_v2": reward_models["hps_v2"]})
    assert "\n" not in str(e.value)
    # a model of another reward family (here a bare text tower) is refused by name
    other = (ClipTextTransformer(vocab_size=10, context_length=4, width=8, heads=2, layers=1, embed_dim=8), {})
    with pytest.raises(ValueError, match="another reward family") as e:
        rewards.build_reward("hps_v2", t2i_reward_models={"hps_v2": other})
    assert "\n" not in str(e.value) and "--model openclip" in str(e.value)


def test_each_reward_gets_its_own_prompt_inputs(reward_models, bpe):
    # A reward without encode_prompts (as ImageReward: BERT ids + mask) takes an encoder;
    # RewardSet.total hands every reward its own reward_text entry.
    hps = rewards.build_reward("hps_v2", t2i_reward_models=reward_models, prompt_tokenizer=bpe)
    toy = rewards.Reward("toy_text", lambda p, x, c: c[0] * jnp.mean(x, axis=(1, 2, 3)) + c[1], {})
    rset = rewards.RewardSet((hps, toy), (1.0, 2.0))
    enc = {"toy_text": lambda caps: (np.arange(len(caps), dtype=np.float32), np.ones(len(caps), np.float32))}
    table = t2i_reward.prompt_reward_inputs(rset, CAPTIONS[:2], enc)
    assert set(table) == {"hps_v2", "toy_text"} and table["hps_v2"].shape == (2, 8)
    x = jnp.full((2, 16, 16, 3), 0.5)
    total, parts = rset.total(rset.params, x, {"condition": None, rewards.REWARD_TEXT: table})
    np.testing.assert_allclose(parts["toy_text"], [1.0, 1.5])
    np.testing.assert_allclose(total, parts["hps_v2"] + 2.0 * parts["toy_text"], rtol=1e-6)


# --------------------------------------------------------------------------- MaskGen


@pytest.fixture(scope="module")
def t2i(reward_models, bpe, fast_jit):
    clip = ClipTextTransformer(vocab_size=48, context_length=T, width=TW, heads=2, layers=2, embed_dim=TW, eos_id=45)
    cp = jax.jit(clip.init)(jax.random.PRNGKey(3), jnp.zeros((1, T), jnp.int32))["params"]
    m = MaskGenVQ(codebook_size=K, seq_len=L, embed_dim=32, depth=1, num_heads=2, text_embed_dim=TW,
                  micro_condition=True, micro_condition_embed_dim=8, condition_num_classes=2)
    mp = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32), jnp.zeros((1, T, TW)),
                         jnp.zeros((1, 1, TW)), jnp.full((1,), 6.5))["params"]
    tok = TATiTok(image_size=16, enc_patch_size=8, dec_patch_size=8, enc_width=16, enc_layers=1, enc_heads=2,
                  dec_width=16, dec_layers=1, dec_heads=2, num_latent_tokens=L, token_size=4, codebook_size=K,
                  text_context_length=T, text_embed_dim=TW)
    tp = jax.jit(tok.init)(jax.random.PRNGKey(4), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, T, TW)))["params"]
    rset = rewards.build_reward_set({"hps_v2": 1.0, "pickscore": 0.1}, t2i_reward_models=reward_models,
                                    prompt_tokenizer=bpe)
    table = prompts.encode_prompt_table(clip, cp, HashTokenizer(T), CAPTIONS, null_prompt="", text_guidance=True)
    table = table.with_extra(reward_text=t2i_reward.prompt_reward_inputs(rset, table.captions))
    plain = make_t2i_tteo_sampler(m, tok, rset, steps=0, temperature=1.0, mesh=make_mesh(8))  # compiled once
    return m, mp, tok, tp, rset, table, plain


def _soft_reward(t2i, gen_params, rows):
    _, _, _, tp, rset, _, plain = t2i
    return float(jnp.mean(plain(gen_params, tp, rset.params, jax.random.PRNGKey(7), rows)["reward_final"]))


def test_reward_finetuning_raises_the_reward_on_8_devices(t2i):
    m, mp, tok, tp, rset, table, _ = t2i
    d = default_distill_config()
    d.update(dict(batch_size=B, lr=3e-3, warmup_steps=1, dropout=0.0, cfg_formula="cond_plus", cfg_scale=3.0,
                  r_init=0.5, sigma_init=0.3))
    r = default_reward_config()
    r.update(dict(batch_size=B, gen_lr=1e-2, gen_warmup_steps=1, gen_weight_decay=0.0, w_reward=1000.0))
    a = adapters.make_adapter(m, d, **prompts.null_conditions_kwargs(table))
    refiner = t2i_reward.T2IRewardRefiner(a, d, r, tok, rset, make_mesh(8))
    teacher = refiner.distiller.place_teacher(mp)
    batch_fn = table.batch_fn(B, seed=0)
    trainer = Trainer("reward", None, lambda rng, s: refiner.init_state(s), refiner.trainer_step_fn(), batch_fn,
                      num_steps=6, mesh=refiner.mesh, frozen={"teacher": teacher, "tokenizer": tp, "reward": rset.params},
                      init_args=(refiner.distiller.init_state(teacher),), compiler_options=FAST)
    state = trainer.init_state()
    rows = table.rows(np.arange(B) % len(table))
    before = _soft_reward(t2i, jax.device_get(state.gen_params), rows)
    for i in range(6):
        state, metrics = trainer.step(state, i)
        metrics = jax.device_get(metrics)
        for k in ("loss", "gen_loss", "aux_loss", "fkl", "reward", "reward_hps_v2", "reward_pickscore"):
            assert np.isfinite(metrics[k]), (i, k)
    after = _soft_reward(t2i, jax.device_get(state.gen_params), rows)
    assert after > before + 2e-3, (before, after)  # measured: +0.0045 (+0.0009 at w_reward 10)


def test_t2i_tteo_plain_equivalence_and_reward_increase(t2i):
    m, mp, tok, tp, rset, table, plain = t2i
    rows = table.rows(np.arange(B) % len(table))
    rng = jax.random.PRNGKey(11)
    out0 = plain(mp, tp, rset.params, rng, rows)
    ids, _ = maskgen_one_step(m, mp, jnp.asarray(rows["condition"]), jnp.asarray(rows["pooled"]), rng, 6.5,
                              r_init=0.5, sigma=0.3, temperature=1.0)
    np.testing.assert_array_equal(out0["ids"], ids)  # K = 0, N = 1 is the plain one-step sampler
    assert out0["images"].shape == (B, 16, 16, 3)
    opt = make_t2i_tteo_sampler(m, tok, rset, steps=4, lr=5.0, best_of=2, mesh=make_mesh(8))
    out = opt(mp, tp, rset.params, rng, rows)
    np.testing.assert_allclose(out["reward_init"], out0["reward_final"], rtol=1e-4, atol=1e-5)
    assert float(jnp.mean(out["reward_final"])) > float(jnp.mean(out["reward_init"])) + 1e-4
    assert opt.cost == {"forward": 10, "backward": 8, "plain_forward": 1, "relative": 26}
