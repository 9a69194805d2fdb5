"""Di[M]O distillation of Meissonic (core/adapters.py MeissonicAdapter, configs/meissonic_t2i_distill.py):
the adapter against the PyTorch fixture (CFG, Di[M]O's perturbed call), a few steps on the 8-device
mesh, and the distill pipeline from the tiny preset (resume, wrong-family refusal)."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from helpers import FAST
from softdimo_jax.conversion.meissonic import convert_meissonic_transformer
from softdimo_jax.core import adapters, dimo, optim
from softdimo_jax.core.defaults import default_distill_config
from softdimo_jax.models.maskgit import MaskGITTransformer
from softdimo_jax.models.meissonic import MeissonicTransformer, guided_logits
from softdimo_jax.parity import load_fixture
from softdimo_jax.parity_checks.meissonic import build_transformer
from softdimo_jax.pipelines import at_scale, meissonic_t2i, phases
from softdimo_jax.runtime.converted import load_converted, save_converted

B = 8


def _jit(fn):
    return jax.jit(fn, compiler_options=FAST)


def _config(**kw):
    c = default_distill_config()
    c.update(dict(batch_size=B, lr=3e-3, warmup_steps=1, dropout=0.0, cfg_formula="uncond_plus", cfg_scale=4.0,
                  r_init=0.5, sigma_init=0.3))
    c.token_grid = (4, 4)
    c.micro_conds = (1024.0, 1024.0, 0.0, 0.0, 6.0)
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def tfx(fixtures_dir):
    return load_fixture(str(fixtures_dir / "meissonic_transformer_a.npz"))


def test_adapter_cfg_and_perturbed_call_equal_the_original(tfx):
    """Row 0 of the fixture is Di[M]O's call (timestep 0, micro-conditions 1024, 1024, 0, 0, 6): the
    adapter's guided teacher logits are the original's uncond + 4 (cond − uncond) over the negative
    prompt, and embed + Di[M]O's σ-perturbation + the student forward is its noise_emb_perturb call."""
    model = build_transformer(tfx.cfg)
    params = convert_meissonic_transformer(tfx.sd, model)
    i, o = tfx.inputs, tfx.outputs
    h, w = i["tokens"].shape[1:]
    cfg = _config(token_grid=(h, w), batch_size=1)
    with pytest.raises(ValueError, match="negative prompt"):
        adapters.make_adapter(model, cfg)
    with pytest.raises(ValueError, match="no dropout"):
        adapters.make_adapter(model, _config(token_grid=(h, w), dropout=0.1), null_condition=i[
            "negative_encoder_hidden_states"][:1], null_pooled=i["negative_pooled_projections"][:1])
    a = adapters.make_adapter(model, cfg, null_condition=i["negative_encoder_hidden_states"][:1],
                              null_pooled=i["negative_pooled_projections"][:1])
    assert isinstance(a, adapters.MeissonicAdapter)
    assert (a.num_tokens, a.splits, a.vocab_size, a.mask_token) == (h * w, 1, 64, 71)
    tokens = np.asarray(i["tokens"][:1], np.int32).reshape(1, h * w, 1)
    labels = {"condition": jnp.asarray(i["encoder_hidden_states"][:1]),
              "pooled": jnp.asarray(i["pooled_projections"][:1]).reshape(1, 1, -1)}
    noise = np.transpose(i["dimo_perturb_noise"][:1], (0, 2, 3, 1))  # NCHW -> NHWC
    sigma = float(i["dimo_noise_emb_perturb"])

    @_jit
    def run(params, tokens, labels, noise):
        z_cfg = dimo.teacher_cfg_logits(a, params, tokens, labels, 4.0, "uncond_plus")
        e = dimo.perturb(a.embed(params, tokens), noise, sigma)
        z_pert = a.student_logits(params, labels, embeddings=e)
        z_t = a.teacher_logits(params, tokens, labels)
        # The model's own CFG on the same input (cond and the negative prompt as two forwards).
        args = (jnp.asarray(i["micro_conds"][:1]), jnp.zeros((1,)))
        ids = tokens.reshape(1, h, w)
        c = model.apply({"params": params}, ids, labels["condition"], labels["pooled"][:, 0], *args)
        u = model.apply({"params": params}, ids, jnp.asarray(i["negative_encoder_hidden_states"][:1]),
                        jnp.asarray(i["negative_pooled_projections"][:1]), *args)
        return z_cfg, z_pert, z_t, guided_logits(c, u, 4.0), c

    with jax.default_matmul_precision("highest"):
        z_cfg, z_pert, z_t, own, c = jax.device_get(run(params, tokens, labels, noise))
    nchw = lambda z: np.transpose(z.reshape(1, h, w, -1), (0, 3, 1, 2))
    assert z_cfg.shape == (1, h * w, 1, 64)
    np.testing.assert_allclose(z_cfg.reshape(own.shape), own, atol=1e-4)
    np.testing.assert_allclose(nchw(z_cfg), o["cfg_logits"][:1], atol=2e-4)
    np.testing.assert_allclose(nchw(z_t), o["logits"][:1], atol=2e-4)
    np.testing.assert_allclose(nchw(z_pert), o["dimo_perturb_logits"][:1], atol=2e-4)
    assert np.abs(z_cfg.reshape(own.shape) - c).max() > 1e-2  # the negative prompt matters
    # Frozen groups (Di[M]O's fix_emb_layer: embedding block and MLM head; no bias, RoPE unlearned).
    assert optim.resolve_frozen(params, ("input_embedding", "output_head", "output_bias", "position_embedding"),
                                a) == ["embed_embeddings", "embed_layer_norm", "embed_conv", "mlm_conv1",
                                       "mlm_layer_norm", "mlm_conv2"]
    with pytest.raises(ValueError, match="text conditions"):
        a.draw_labels(jax.random.PRNGKey(0), 1, None)
    # Soft tokens: one-hot probabilities through embed_soft are the hard embedding.
    one_hot = jax.nn.one_hot(tokens[..., 0], model.vocab_size)
    np.testing.assert_allclose(np.asarray(a.embed_soft(params, one_hot)), np.asarray(a.embed(params, tokens)),
                               atol=1e-5)


# ------------------------------------------------------------------------------- a few steps, 8 devices


def _tiny_config(**kw):
    spec = importlib.util.spec_from_file_location("meissonic_cfg", "configs/meissonic_t2i_distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.unlock()
    c.update(kw)
    return c


def _leaves(tree):
    return {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture
def xla_cache(tmp_path):
    """A persistent compilation cache for this test only: its three runs compile the same programs."""
    keys = {"jax_compilation_cache_dir": str(tmp_path / "xla_cache"), "jax_persistent_cache_min_compile_time_secs": 0.0}
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v)
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def test_tiny_preset_distills_on_8_devices_resumes_exactly_and_refuses_other_families(tmp_path, monkeypatch,
                                                                                        xla_cache):
    """configs/meissonic_t2i_distill.py:tiny through the distill pipeline (random tiny models and
    conditions, all 8 devices, FSDP 2): finite losses, θ and ψ move except the frozen embedding
    block and MLM head, the student is exported, the one-step grids are written; 2 steps then a
    restart to 4 equals 4 steps in one go; a teacher checkpoint of another family is refused."""
    monkeypatch.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=FAST))
    monkeypatch.setattr(phases, "step_compiler_options", lambda dcfg: FAST)  # the Trainer's step jit
    runs = []
    train = phases.train_distill
    monkeypatch.setattr(phases, "train_distill", lambda *a, **k: runs.append(train(*a, **k)) or runs[-1])
    config = _tiny_config()
    config.distill.update(dict(num_steps=2, fsdp=2))
    a = str(tmp_path / "a")
    at_scale.distill(config, a)
    (result, distiller), = runs
    assert distiller.mesh.size == 8 and int(result.state.step) == 2
    for k in ("loss", "gen_loss", "aux_loss", "fkl", "rkl", "gen_grad_norm"):
        assert all(np.isfinite(h[k]) for h in result.history), k
    assert result.history[-1]["fkl"] > 0 and result.history[-1]["gen_grad_norm"] > 0
    _, teacher, _ = meissonic_t2i.random_models(config)
    t = _leaves(teacher)
    frozen = ("embed_embeddings", "embed_layer_norm", "embed_conv", "mlm_conv1", "mlm_layer_norm", "mlm_conv2")
    for name in ("gen_params", "aux_params"):
        new = _leaves(getattr(result.state, name))
        for k in t:
            if k.split("/")[0] in frozen:
                np.testing.assert_array_equal(new[k], t[k], err_msg=f"{name} {k}")
        trainable = [k for k in t if k.split("/")[0] not in frozen]
        moved = [k for k in trainable if not np.array_equal(new[k], t[k])]
        assert len(moved) > 0.9 * len(trainable), (name, sorted(set(trainable) - set(moved)))
    student, student_params = load_converted(os.path.join(a, "distill", "student"))
    assert isinstance(student, MeissonicTransformer) and student.codebook_size == 16
    for mode in ("hard", "soft"):
        assert os.path.getsize(os.path.join(a, "distill", f"student_{mode}.png")) > 0

    # Restart to 4 steps (no grid) == 4 steps in one go.
    config.update(dict(grid_samples=0))
    config.distill.num_steps = 4
    at_scale.distill(config, a)
    at_scale.distill(config, str(tmp_path / "b"))
    resumed, straight = runs[1][0], runs[2][0]
    assert resumed.resumed_from == 2 and int(resumed.state.step) == int(straight.state.step) == 4
    got, want = _leaves(resumed.state), _leaves(straight.state)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert sorted(os.listdir(os.path.join(a, "distill", "checkpoints"))) == ["2", "4"]

    # A teacher checkpoint of another family: one line naming the mismatch.
    other = MaskGITTransformer(img_size=64, hidden_dim=16, codebook_size=8, depth=1, heads=2, mlp_dim=32, nclass=2)
    op = other.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]
    save_converted(str(tmp_path / "maskgit"), "maskgit_transformer", other, op)
    config.teacher_checkpoint = str(tmp_path / "maskgit")
    with pytest.raises(ValueError, match="teacher_family is 'meissonic_transformer'") as e:
        at_scale.distill(config, str(tmp_path / "c"))
    assert "\n" not in str(e.value)


def test_prompt_embedding_files(tmp_path):
    """The .npz conditions: this host's rows, the negative prompt as the null condition, and one-line
    refusals of a missing file, missing arrays and widths that do not fit the transformer."""
    from softdimo_jax.data import prompt_embeddings
    from softdimo_jax.runtime.errors import BadInput

    arrays = prompt_embeddings.random_prompt_embeddings(5, 6, 12, 16, seed=3)
    path = tmp_path / "p.npz"
    np.savez(path, **arrays)
    config = _tiny_config(prompt_embeddings=str(path), random_init=False)
    model = MeissonicTransformer(**{k: (tuple(v) if isinstance(v, list) else v)
                                    for k, v in config.random_transformer.items()})
    table = meissonic_t2i.prompt_table(config, model, index=1, count=2)
    assert len(table) == 2 and table.captions == ["random prompt 1", "random prompt 3"]
    np.testing.assert_array_equal(table.condition, arrays["encoder_hidden_states"][1::2])
    np.testing.assert_array_equal(table.pooled[:, 0], arrays["pooled_projections"][1::2])
    assert table.null_condition.shape == (1, 6, 12) and table.null_pooled.shape == (1, 1, 16)
    grid = meissonic_t2i.grid_conditions(config, model, 7)  # the whole file's first rows, repeated
    np.testing.assert_array_equal(grid["condition"][5], arrays["encoder_hidden_states"][0])
    with pytest.raises(BadInput, match="not found"):
        meissonic_t2i.prompt_table(_tiny_config(prompt_embeddings=str(tmp_path / "no.npz")), model)
    with pytest.raises(BadInput, match="prompt_embeddings are empty"):
        meissonic_t2i.prompt_table(_tiny_config(random_init=False), model)
    np.savez(path, **{k: v for k, v in arrays.items() if not k.startswith("negative")})
    with pytest.raises(BadInput, match="negative_encoder_hidden_states"):
        meissonic_t2i.prompt_table(config, model)
    np.savez(path, **dict(arrays, encoder_hidden_states=arrays["encoder_hidden_states"][..., :8],
                          negative_encoder_hidden_states=arrays["negative_encoder_hidden_states"][..., :8]))
    with pytest.raises(BadInput, match="joint_attention_dim 12"):
        meissonic_t2i.prompt_table(config, model)
