"""Ahead-of-time compilation of the real training step for a TPU topology, on this CPU host
(libtpu from the `tpu` extra describes the topology; nothing runs on a TPU)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from softdimo_jax import aot
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.converted import FAMILIES, expected_params, save_converted

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "maskbit_imagenet256_distill.py")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A converted 1-layer LFQBert (hidden 256, MLP 1024: its MLP kernels are large enough
    for the FSDP rule to shard them)."""
    cfg = FAMILIES["maskbit_generator"].default_config(6)
    cfg.update(num_tokens=16, hidden_dim=256, depth=1, heads=4, mlp_dim=1024, num_classes=10, dropout=0.0)
    model = FAMILIES["maskbit_generator"].build(cfg)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda: expected_params(model)))
    path = str(tmp_path_factory.mktemp("aot") / "gen")
    save_converted(path, "maskbit_generator", model, params)
    return path


def _config(teacher):
    spec = importlib.util.spec_from_file_location("maskbit_distill_config", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.teacher_checkpoint = teacher
    return config


def test_v5e_2x2_distill_step_has_the_config_shardings(tiny_teacher):
    devices = aot.topology_devices("v5e:2x2")
    assert len(devices) == 4 and all(d.platform == "tpu" for d in devices)
    r = aot.analyse(_config(tiny_teacher), "distill", devices, per_chip=2, fsdp=2, topology="v5e:2x2")
    assert r["fits"] and r["mesh"] == {"data": 2, "fsdp": 2} and r["global_batch"] == 8
    trainer, compiled = r["trainer"], r["compiled"]
    # The compiled step takes (and returns) the state in exactly the shardings the config's
    # fsdp=2 asks for: large kernels split along 'fsdp', the rest replicated.
    got = aot.param_shardings(compiled)
    want = trainer.state_shardings
    # XLA prunes state leaves the step never reads (the EMA of frozen groups): None there.
    g_leaves = jax.tree.leaves(got, is_leaf=lambda x: x is None)
    w_leaves = jax.tree.leaves(want)
    assert len(g_leaves) == len(w_leaves) and sum(g is None for g in g_leaves) < len(g_leaves) // 10
    shapes = jax.tree.leaves(trainer.state_shapes)
    n_sharded = 0
    for g, w, s in zip(g_leaves, w_leaves, shapes):
        assert g is None or g.is_equivalent_to(w, len(s.shape)), (s.shape, g, w)
        if "fsdp" in jax.tree.leaves(tuple(w.spec)):
            n_sharded += 1
            assert max(s.shape) >= 1024
    # The two MLP kernels of θ, ψ, the EMA and the Adam moments (mu, nu) of θ and ψ.
    assert n_sharded == 7 * 2
    out_state = compiled.output_shardings[0]
    for o, w, s in zip(jax.tree.leaves(out_state), w_leaves, shapes):
        assert o.is_equivalent_to(w, len(s.shape))
    # The frozen teacher travels sharded by the same rule.
    mlp = trainer.frozen["teacher"]
    spec = [x.sharding.spec for x in jax.tree.leaves(mlp) if x.size >= 2**18]
    assert spec and all("fsdp" in tuple(s) for s in spec)
    mem = r["memory"]
    assert mem["aliased"] > 0  # the state is donated
    assert 0 < r["peak"] < 1 * 2**30 and r["flops"] > 0
    line = aot.report(r, "v5e:2x2", "distill")[-1]
    assert line.startswith("aot: topology=v5e:2x2 phase=distill per_chip_batch=2 fits=yes peak_gib=")
    assert " hbm_gib=16.0 gflops_per_step=" in line


def test_data_parallel_keeps_every_parameter_replicated(tiny_teacher):
    devices = aot.topology_devices("v5e:2x2")
    mesh = meshlib.make_mesh(4, fsdp=1, devices=devices)
    trainer, batch = aot.build_phase(_config(tiny_teacher), "distill", mesh)
    assert batch is None  # the distillation draws its labels in the step
    assert all(s.spec == P() for s in jax.tree.leaves(trainer.state_shardings))


def _cli(*args, env=None):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "softdimo_jax.aot", *args], capture_output=True, text=True,
                          cwd=ROOT, env=full, timeout=300)


def test_cli_refuses_bad_input_in_one_line(tiny_teacher):
    r = _cli(f"--config={CONFIG}", "--topology=v9z:1x1", f"--config.teacher_checkpoint={tiny_teacher}")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("aot: cannot describe TPU topology 'v9z:1x1'") and "—" in last
    r = _cli(f"--config={CONFIG}", "--phase=gan", f"--config.teacher_checkpoint={tiny_teacher}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("aot: this config has no 'gan'")
    r = _cli(f"--config={CONFIG}", "--fsdp=3", f"--config.teacher_checkpoint={tiny_teacher}")
    assert r.returncode == 2 and "fsdp=3 does not divide the 4 devices" in r.stderr
    r = _cli("--config=configs/no_such_config.py", "--phase=distill")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "config file configs/no_such_config.py not found" in r.stderr
    r = _cli(f"--config={CONFIG}", "--config.no_such_key=1")
    assert r.returncode == 2 and "bad config override --config.no_such_key" in r.stderr.strip().splitlines()[-1]


def test_depth_extrapolation_recovers_a_bilinear_peak(monkeypatch, tiny_teacher):
    """--depths: peak(d, b) = c0 + c1 d + b (c2 + c3 d) and FLOPs ∝ d b are recovered exactly
    from compiles at two depths (here faked), and the largest batch under HBM is solved for."""
    gib = 2**30
    peak = lambda d, b: (1.0 + 0.25 * d + b * (0.01 + 0.02 * d)) * gib

    def fake(config, phase, devices, per_chip, fsdp, topology, depth=None):
        return dict(per_chip_batch=per_chip, global_batch=per_chip * 4, devices=4, mesh={"data": 1, "fsdp": 4},
                    depth=depth, peak=peak(depth, per_chip), flops=1e9 * depth * per_chip, seconds=1.0,
                    fits=True, memory={"arguments": depth * gib, "outputs": 0, "aliased": 0, "temporaries": 0,
                                       "generated_code": 0})

    monkeypatch.setattr(aot, "analyse", fake)
    config = _config(tiny_teacher)
    devices = aot.topology_devices("v5e:2x2")
    full = aot.full_depth(config, "distill")  # the converted teacher's depth (1)
    r = aot.extrapolate(config, "distill", devices, 4, "v5e:2x2", (2, 4), per_chip=8)
    assert r["peak"] == pytest.approx(peak(full, 8)) and r["flops"] == pytest.approx(1e9 * full * 8)
    assert r["memory"]["arguments"] == pytest.approx(full * gib) and "depths 2,4 -> 1" in r["extrapolated"]
    best = aot.extrapolate(config, "distill", devices, 4, "v5e:2x2", (2, 4), per_chip=None)
    b = best["per_chip_batch"]
    assert peak(full, b) <= 16 * gib < peak(full, b + 1) and best["fits"]


def test_meissonic_distill_step_lowers_with_prompt_conditions_at_a_scaled_depth(tmp_path):
    """Meissonic's distillation step takes the prompt-embedding rows as its batch, and
    --depths scales its dual- and single-stream blocks together (here 2 + 4 -> 1 + 2)."""
    spec = importlib.util.spec_from_file_location("meissonic_config", ROOT / "configs" / "meissonic_t2i_distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("tiny")
    fields = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.random_transformer.items()}
    fields.update(num_layers=2, num_single_layers=4)
    model = aot.MeissonicTransformer(**fields)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda: expected_params(model)))
    config.teacher_checkpoint = str(tmp_path / "meissonic")
    save_converted(config.teacher_checkpoint, "meissonic_transformer", model, params)
    assert aot.full_depth(config, "distill") == 2
    with pytest.raises(aot.BadInput, match="use depths that divide evenly"):
        aot.scaled_depth("meissonic_transformer", {"num_layers": 4, "num_single_layers": 6}, 3, "teacher")
    mesh = meshlib.make_mesh(4, fsdp=2, devices=aot.topology_devices("v5e:2x2"))
    trainer, batch = aot.build_phase(config, "distill", mesh, depth=1)
    teacher = trainer.frozen["teacher"]
    assert sum(k.startswith("transformer_blocks_") for k in teacher) == 1
    assert sum(k.startswith("single_transformer_blocks_") for k in teacher) == 2
    b = int(config.distill.batch_size)
    assert batch["condition"].shape == (b, 77, fields["joint_attention_dim"])
    assert batch["pooled"].shape == (b, 1, fields["pooled_projection_dim"])
    step = jax.ShapeDtypeStruct((), jnp.int32)
    lowered = trainer.compiled_step().lower(trainer.abstract_state(), batch, step, trainer.frozen)
    assert "stablehlo" in lowered.as_text()[:20000]


def test_h100_topology_needs_the_cuda_plugin_or_gives_compile_only_gpus():
    with pytest.raises(aot.BadInput, match="write h100:N"):
        aot.topology_devices("h100:eight")
    try:
        plugin = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:
        plugin = False
    if not plugin:  # the test environment
        with pytest.raises(aot.BadInput, match=r"install the gpu_aot extra"):
            aot.topology_devices("h100:8")
    else:
        devices = aot.topology_devices("h100:2x4")
        assert len(devices) == 8 and devices[0].platform == "gpu"
    assert aot.hbm_gib("h100:8") == pytest.approx(79.14, abs=0.01)
