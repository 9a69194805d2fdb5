"""Ahead-of-time compilation of a config's training step for a TPU topology (no TPU needed).

    python -m softdimo_jax.aot --config=configs/maskbit_imagenet256_distill.py --phase=distill \\
        --topology=v5e:4x4 [--num_slices=2] [--per_chip_batch=64 | --find_batch] [--fsdp=4]
        [--config.distill.remat=False ...]

Builds the phase's `Trainer` exactly as a run does (`pipelines.phases`), from abstract
arrays (`jax.eval_shape`: nothing is allocated, no checkpoint is read; the models come from
the config's converted checkpoints' `model.json` when set, else from the family's released
size), on a mesh over the topology's devices, then lowers and compiles the Trainer's one
jitted step (`runtime.trainer.jit_train_step`) with its real shardings and donation. With
jax[tpu] installed (the `tpu` extra: libtpu) this runs on a CPU-only host. It prints, per
device: arguments, outputs, aliased, temporaries, generated code, the peak against the
chip's HBM, FLOPs per step and per image, and, last, one line scripts read:

    aot: topology=T phase=P per_chip_batch=N fits=yes|no peak_gib=X hbm_gib=Y gflops_per_step=Z

(`gflops_per_step` per device). `--find_batch` compiles at 1 and 2 images per chip, fits the
peak's straight line in the batch, then checks its prediction (stepping down until it
fits). `--depths=D1,D2` compiles the teacher at two shallower depths and extrapolates
peak and FLOPs linearly to the full depth (an estimate, said so in the output; with
`--find_batch`, four compiles fit peak(depth, batch)). The FLOPs come out exact; the peak
can be far off either way on TPU, whose compiler changes its memory choices with depth
(measured: 5.5x high on v6e:4x4, 13% low on v5e:4x4), so confirm the slice you will run
on with a full-depth compile. `--topology=cpu:N` compiles for N
local CPU devices (the memory a CPU run needs);
`--topology=h100:N` for N H100 80GB GPUs (memory only: XLA's GPU compiler reports no FLOPs;
needs the `gpu_aot` extra, jax's CUDA plugin, but no GPU or driver).
v4 topologies use the megacore chip config (one device per chip). Phases: distill (every
family), gan and reward (MaskBit), teacher (MaskBit). Notes: XLA counts a loop body once in
`cost_analysis`; our transformers unroll their layers, so the FLOPs are whole.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from softdimo_jax.core import objectives
from softdimo_jax.core import reward as rewards
from softdimo_jax.core.adapters import make_adapter
from softdimo_jax.core.dimo import Distiller
from softdimo_jax.core.gan import GanRefiner
from softdimo_jax.models.maskbit_bert import LFQBert
from softdimo_jax.models.maskgen import MaskGenVQ
from softdimo_jax.models.meissonic import MeissonicTransformer
from softdimo_jax.models.meissonic_text import MeissonicTextEncoder
from softdimo_jax.pipelines import phases
from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.runtime.converted import FAMILIES, config_value_to_json, expected_params, read_meta
from softdimo_jax.runtime.config_files import parse_flags, rewrite_config_arg
from softdimo_jax.runtime.errors import BadInput, RunFailure, debug_requested, guarded, strip_debug

GIB = 2**30
# HBM per chip (GiB), by the topology name's prefix.
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5litepod": 16.0, "v5p": 95.0, "v6e": 32.0,
           "h100": 84978434048 / 2**30}  # H100 80GB: the 79.1 GiB CUDA reports
PHASES = ("distill", "gan", "reward", "teacher")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, so importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "ml_collections config file[:preset]", lock_config=True)
    flags.DEFINE_string("phase", None, f"one of {PHASES} (default: the config's pipeline)")
    flags.DEFINE_string("topology", "v5e:2x2", "TPU topology (v5e:4x4, v5p:2x2x1, v6e:4x4, v4:4x4x4, ...), "
                        "h100:N (memory only; the gpu_aot extra) or cpu:N")
    flags.DEFINE_integer("num_slices", 1, "slices of the topology (multi-slice over DCN)")
    flags.DEFINE_integer("per_chip_batch", 0, "images per chip (0: the config's global batch / chips)")
    flags.DEFINE_bool("find_batch", False, "report the largest per-chip batch that fits")
    flags.DEFINE_integer("fsdp", 0, "size of the 'fsdp' mesh axis (0: the config's)")
    flags.DEFINE_list("depths", [], "two teacher depths D1,D2: compile there and extrapolate to the full depth")


# --------------------------------------------------------------------------- devices


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The devices of a TPU topology (abstract: compile-only) or `cpu:N` local CPU devices."""
    if name.startswith("cpu"):
        n = int(name.partition(":")[2] or len(jax.devices("cpu")))
        cpus = jax.devices("cpu")
        if n > len(cpus):
            raise BadInput(f"--topology={name}: JAX sees {len(cpus)} CPU devices — set "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        return cpus[:n]
    if name.startswith("h100"):
        return gpu_devices(name)
    # libtpu warns at length when it cannot find these on a host that is not a TPU VM.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compile-only use never touches a chip: several processes (pytest workers, a second
    # aot command) may load libtpu at once instead of failing on /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise BadInput(f"jax.experimental.topologies is missing ({e}) — install jax==0.10.2") from e
    kwargs = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
    try:
        topo = topologies.get_topology_desc(topology_name=name, platform="tpu", num_slices=int(num_slices), **kwargs)
    except Exception as e:  # no libtpu, or a name libtpu does not know
        msg = " ".join(str(e).split())[:200]
        raise BadInput(f"cannot describe TPU topology {name!r} ({msg}) — install the tpu extra "
                       "(pip install -e '.[tpu]') and use a name such as v5e:2x2, v5p:2x2x1, v4:2x2x2") from e
    return list(topo.devices)


# XLA's GPU target description of an H100 SXM 80GB (device_description.proto text): what
# the GPU compiler needs in place of a visible device. Hardware facts only; no autotuning
# results, so the compile picks default kernels (the memory plan is what we read).
H100_TARGET_CONFIG = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def gpu_devices(name: str) -> list:
    """`h100:N` (N GPUs on one host) or `h100:HxN` (H hosts of N): compile-only devices of the
    CUDA plugin described by `H100_TARGET_CONFIG` — no GPU or driver needed. Memory only: XLA's
    GPU compiler reports no FLOPs."""
    m = re.fullmatch(r"h100:(?:(\d+)x)?(\d+)", name)
    if not m:
        raise BadInput(f"--topology={name}: write h100:N (N GPUs) or h100:HxN (H hosts of N GPUs)")
    hosts, per_host = int(m.group(1) or 1), int(m.group(2))
    # The plugin checks the CUDA libraries' versions against a driver there is none of.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(topology_name="", platform="cuda", topology=f"1x{hosts}x{per_host}",
                                            target_config=H100_TARGET_CONFIG)
    except (NotImplementedError, RuntimeError) as e:  # no CUDA plugin installed
        msg = " ".join(str(e).split())[:200]
        raise BadInput(f"cannot describe {name} ({msg}) — install the gpu_aot extra "
                       "(pip install -e '.[gpu_aot]': jax's CUDA 12 plugin, no GPU needed)") from e
    return list(topo.devices)


def hbm_gib(name: str) -> float | None:
    return None if name.startswith("cpu") else HBM_GIB.get(name.split(":")[0])


# --------------------------------------------------------------------------- models


def _model_spec(path: str, family: str, bits: int | None, *, what: str):
    """(family, module config) from a converted checkpoint's model.json, else the family's
    released size."""
    if path:
        try:
            meta = read_meta(path)
        except (FileNotFoundError, ValueError) as e:
            raise BadInput(f"{what} {path}: {e}") from e
        return meta["family"], dict(meta["config"])
    if family not in FAMILIES:
        raise BadInput(f"unknown {what} family {family!r} — use one of {sorted(FAMILIES)}")
    cfg = FAMILIES[family].default_config(bits)
    return family, {k: config_value_to_json(v) for k, v in cfg.items()}


# The layer-count fields of each transformer family; the first is "the depth" of --depths
# and the others keep their ratio to it (Meissonic: 14 dual- and 28 single-stream blocks,
# so depth d means d dual + 2d single blocks).
DEPTH_FIELDS = {"meissonic_transformer": ("num_layers", "num_single_layers")}


def scaled_depth(family: str, cfg: dict, depth: int, what: str) -> dict:
    """The layer-count fields of `cfg` at `depth` (the first field's value)."""
    fields = DEPTH_FIELDS.get(family, ("depth",))
    if fields[0] not in cfg:
        raise BadInput(f"the {family} {what} has no {fields[0]!r} field — drop --depths")
    full = int(cfg[fields[0]])
    out = {}
    for f in fields:
        n = int(cfg[f]) * depth
        if n % full:
            raise BadInput(f"--depths: {depth} of {full} layers leaves a fraction of the {cfg[f]} {f} of the "
                           f"{family} {what} — use depths that divide evenly, e.g. 1,2")
        out[f] = n // full
    return out


def model_depth(model) -> int:
    """The model's depth in the sense of `scaled_depth`."""
    for fields in DEPTH_FIELDS.values():
        if hasattr(model, fields[0]):
            return int(getattr(model, fields[0]))
    return int(model.depth)


def build_model(path: str, family: str, bits: int | None = None, *, what: str, depth: int | None = None,
                **runtime):
    """(model, abstract float32 params) without reading any weights; `depth` overrides the
    number of transformer layers (the depth extrapolation of `--depths`)."""
    fam, cfg = _model_spec(path, family, bits, what=what)
    if depth:
        cfg.update(scaled_depth(fam, cfg, int(depth), what))
    cfg.update({k: config_value_to_json(v) for k, v in runtime.items()})
    model = FAMILIES[fam].build(cfg)
    params = jax.eval_shape(lambda: expected_params(model))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32 if jnp.issubdtype(
        x.dtype, jnp.floating) else x.dtype), params)
    return model, params


def teacher_model(config, depth: int | None = None):
    d = config.distill
    return build_model(config.get("teacher_checkpoint", ""), config.get("teacher_family") or "maskbit_generator",
                       what="teacher", depth=depth, dtype=d.compute_dtype, remat=bool(d.remat))


def tokenizer_model(config, bits: int):
    return build_model(config.get("tokenizer_checkpoint", ""), "maskbit_tokenizer", bits, what="tokenizer")


def struct(shape, dtype, mesh=None):
    sharding = None if mesh is None else meshlib.batch_sharding(mesh, len(shape))
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def maskgen_conditions(config, batch: int):
    """MaskGen's condition shapes from the text tower's config (OpenCLIP penultimate tokens
    and pooled embedding): ((1, T, W), (1, 1, E)) null condition, the batch's rows."""
    clip, clip_params = build_model(config.get("text_encoder_checkpoint", ""), "clip_text", what="text encoder")
    ids = jax.ShapeDtypeStruct((1, int(clip.context_length)), jnp.int32)
    out = jax.eval_shape(lambda p, i: clip.apply({"params": p}, i), clip_params, ids)
    t, p = out.penultimate, out.pooled
    p_shape = p.shape if p.ndim == 3 else (p.shape[0], 1, p.shape[-1])
    null = dict(null_condition=np.zeros(t.shape, np.float32), null_pooled=np.zeros(p_shape, np.float32))
    rows = {"condition": (batch,) + tuple(t.shape[1:]), "pooled": (batch,) + tuple(p_shape[1:])}
    return null, rows


def meissonic_conditions(config, batch: int):
    """Meissonic's condition shapes (CLIP-H penultimate tokens and projected pooled
    embedding, as the prompt-embedding file holds them): the negative prompt's, the batch's."""
    model, _ = teacher_model(config)
    t = (1, int(MeissonicTextEncoder.context_length), int(model.joint_attention_dim))
    p = (1, 1, int(model.pooled_projection_dim))
    null = dict(null_condition=np.zeros(t, np.float32), null_pooled=np.zeros(p, np.float32))
    return null, {"condition": (batch,) + t[1:], "pooled": (batch,) + p[1:]}


# --------------------------------------------------------------------------- phases


def set_global_batch(config, phase: str, batch: int) -> None:
    block = {"distill": "distill", "gan": "gan", "reward": "reward"}.get(phase)
    if phase == "teacher":
        config.teacher.train.batch_size = batch
    else:
        config[block].batch_size = batch
    if phase in ("gan", "reward"):
        config.distill.batch_size = batch


def build_phase(config, phase: str, mesh, depth: int | None = None):
    """(trainer, batch) of `phase`: the Trainer the run builds, over abstract arrays, and the
    abstract global batch of one step (`depth`: the teacher's layers, for --depths)."""
    if phase == "teacher":
        tok, tok_params = tokenizer_model(config, int(config.tokenizer.num_bits))
        size = int(config.data.image_size)
        grid = size // tok.downsample_factor
        mcfg = config.teacher.model.copy_and_resolve_references()
        if depth:
            mcfg.depth = int(depth)
        model = objectives.teacher_from_config(mcfg, grid * grid, tok.num_bits)
        b = int(config.teacher.train.batch_size)
        trainer = phases.teacher_trainer(
            model, config.teacher.train, None, None, tokenizer=tok, frozen={"tokenizer": tok_params}, mesh=mesh,
            fsdp=mesh.shape["fsdp"] > 1, seed=int(config.seed))
        return trainer, {"image": struct((b, size, size, 3), jnp.float32, mesh), "label": struct((b,), jnp.int32, mesh)}

    dcfg = config.distill
    model, teacher = teacher_model(config, depth)
    if phase == "distill":
        batch, kwargs = None, {}
        if isinstance(model, (MaskGenVQ, MeissonicTransformer)):
            conditions = maskgen_conditions if isinstance(model, MaskGenVQ) else meissonic_conditions
            kwargs, rows = conditions(config, int(dcfg.batch_size))
            batch = {k: struct(v, jnp.float32, mesh) for k, v in rows.items()}
        distiller = Distiller(make_adapter(model, dcfg, **kwargs), dcfg, mesh)
        trainer = phases.distill_trainer(distiller, teacher, None, batch_fn=lambda step: None,
                                         compiler_options=phases.step_compiler_options(dcfg)
                                         if mesh.devices.flat[0].platform == "cpu" else None)
        return trainer, batch

    if not isinstance(model, LFQBert):
        raise BadInput(f"the {phase} phase runs on MaskBit teachers, this config's is {type(model).__name__} "
                       "— use --phase=distill")
    tok, tok_params = tokenizer_model(config, int(model.num_bits))
    adapter = make_adapter(model, dcfg)
    if phase == "gan":
        gcfg = config.gan
        refiner = GanRefiner(adapter, dcfg, gcfg, mesh, tokenizer=tok)
        teacher = refiner.distiller.place_teacher(teacher)
        dimo_state = Distiller(adapter, dcfg, mesh).abstract_state(teacher)
        init = lambda s, tp: refiner.init_state(jax.random.PRNGKey(int(gcfg.seed)), s, tp)
        trainer = phases.refinement_trainer(
            "gan", refiner, init, (dimo_state, teacher), gcfg, None, batch_fn=lambda step: None,
            frozen={"teacher": teacher, "tokenizer": tok_params}, keep=1, fingerprint=None)
        b, size = int(gcfg.batch_size), int(config.data.image_size)
        return trainer, {"image": struct((b, size, size, 3), jnp.float32, mesh), "label": struct((b,), jnp.int32, mesh)}
    if phase == "reward":
        rcfg = config.reward
        spec = {name: w for name, w in rcfg.rewards.items() if w}
        try:
            rset = rewards.build_reward_set(spec)
        except (TypeError, KeyError, ValueError) as e:
            raise BadInput(f"the reward set {spec} cannot be built without its checkpoints ({e}) — "
                           "AOT-check a config whose rewards need no weights") from e
        teacher = Distiller(adapter, dcfg, mesh).place_teacher(teacher)
        start = Distiller(adapter, dcfg, mesh).abstract_state(teacher)
        grid = int(config.data.image_size) // tok.downsample_factor
        refiner = rewards.RewardRefiner(adapter, dcfg, rcfg, tok, rset, (grid, grid), mesh)
        reward_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), rset.params)
        trainer = phases.refinement_trainer(
            "reward", refiner, refiner.init_state, (start,), rcfg, None, batch_fn=lambda step: None,
            frozen={"teacher": teacher, "tokenizer": tok_params, "reward": reward_params}, keep=1, fingerprint=None)
        return trainer, None
    raise BadInput(f"--phase={phase!r} is not one of {PHASES}")


# --------------------------------------------------------------------------- compile


def compile_step(trainer, batch):
    """The Trainer's jitted step, lowered with the abstract state / batch / frozen models."""
    step = jax.ShapeDtypeStruct((), jnp.int32)
    return trainer.compiled_step().lower(trainer.abstract_state(), batch, step, trainer.frozen).compile()


def param_shardings(compiled) -> Any:
    """The compiled step's input shardings of the state (argument 0)."""
    args, _ = compiled.input_shardings
    return args[0]


_OOM = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def analyse(config, phase: str, devices: list, per_chip: int, fsdp: int, topology: str,
            depth: int | None = None) -> dict:
    """Compiles the step at `per_chip` images per chip; returns the per-device numbers."""
    config = config.copy_and_resolve_references()
    n = len(devices)
    set_global_batch(config, phase, per_chip * n)
    if fsdp:
        config.distill.fsdp = fsdp
    f = int(config.distill.fsdp) if phase != "teacher" else int(config.mesh.fsdp)
    if n % f:
        raise BadInput(f"fsdp={f} does not divide the {n} devices of {topology} — pass --fsdp=F with F | {n}")
    mesh = meshlib.make_mesh(n, fsdp=f, devices=devices)
    if depth and phase == "gan":
        # The discriminator taps teacher layers: keep their number (the heads' size) and
        # map them into the shallow teacher.
        full = full_depth(config, phase)
        config.gan.disc_layers = tuple(min(int(l) % full * depth // full, depth - 1) for l in config.gan.disc_layers)
    trainer, batch = build_phase(config, phase, mesh, depth)
    t0 = time.time()
    out = dict(per_chip_batch=per_chip, global_batch=per_chip * n, devices=n, mesh=dict(mesh.shape), depth=depth)
    try:
        compiled = compile_step(trainer, batch)
    except Exception as e:  # XlaRuntimeError: an OOM is reported at compile time on TPU
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        m = _OOM.search(text)
        out.update(fits=False, seconds=time.time() - t0, oom=" ".join(text.split())[:300])
        if m:
            out["peak"] = float(m.group(1)) * _UNIT[m.group(2)]
        return out
    out["seconds"] = time.time() - t0
    ma = compiled.memory_analysis()
    mem = dict(arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes, aliased=ma.alias_size_in_bytes,
               temporaries=ma.temp_size_in_bytes, generated_code=ma.generated_code_size_in_bytes)
    peak = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["generated_code"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", float("nan")))  # None on GPU: memory only
    hbm = hbm_gib(topology)
    out.update(memory=mem, peak=peak, flops=flops, compiled=compiled, trainer=trainer,
               fits=True if hbm is None else peak <= hbm * GIB)
    # One line per compile as it finishes: a long --depths / --find_batch run shows progress.
    print(f"  compiled {topology} {phase} depth={depth or 'full'} per_chip={per_chip} in {out['seconds']:.0f}s: "
          f"peak {peak / GIB:.3f} GiB, {flops / 1e9:.1f} GFLOP per device", file=sys.stderr, flush=True)
    return out


def find_batch(config, phase, devices, fsdp, topology) -> dict:
    """The largest per-chip batch that fits: a line through the peaks at 1 and 2 per chip,
    then compile its prediction and step down until it fits."""
    hbm = hbm_gib(topology)
    if hbm is None:
        raise BadInput("--find_batch needs a TPU topology (a chip's HBM); cpu:N has no limit")
    a = analyse(config, phase, devices, 1, fsdp, topology)
    if not a["fits"]:
        return a
    b = analyse(config, phase, devices, 2, fsdp, topology)
    if not b["fits"]:
        return a
    slope = max(b["peak"] - a["peak"], 1.0)
    guess = max(2, int((hbm * GIB - a["peak"]) // slope) + 1)
    best = b
    for _ in range(6):
        r = analyse(config, phase, devices, guess, fsdp, topology)
        if r["fits"]:
            return r if r["per_chip_batch"] >= best["per_chip_batch"] else best
        over = (r.get("peak") or hbm * GIB * 1.1) - hbm * GIB
        guess = max(best["per_chip_batch"], guess - max(1, int(np.ceil(over / slope))))
        if guess == best["per_chip_batch"]:
            return best
    return best


def full_depth(config, phase: str) -> int:
    if phase == "teacher":
        return int(config.teacher.model.depth)
    return model_depth(teacher_model(config)[0])


def extrapolate(config, phase, devices, fsdp, topology, depths: tuple[int, int], per_chip: int | None) -> dict:
    """Per-device peak and FLOPs at the full depth from compiles at two shallower depths.

    Every term of the step is linear in the layer count at a fixed batch (parameters,
    optimiser state, the per-layer activations remat keeps, the FLOPs), and linear in the
    batch at a fixed depth, so peak(d, b) = c0 + c1 d + b (c2 + c3 d): two depths × two
    batches fix it. With `per_chip` the batch is given (two compiles, at that batch), else
    the largest batch under the chip's HBM is solved for (four compiles at 1 and 2 per chip).
    An estimate: full-depth compiles take minutes to hours on a small host."""
    d1, d2 = depths
    dn = full_depth(config, phase)
    batches = (per_chip,) if per_chip else (1, 2)
    runs = {(d, b): analyse(config, phase, devices, b, fsdp, topology, depth=d) for d in (d1, d2) for b in batches}
    for r in runs.values():
        if "memory" not in r:
            raise RunFailure(f"the depth-{r['depth']} step at {r['per_chip_batch']} per chip does not fit "
                             f"{topology} already — compile at full depth or use a bigger slice")
    lin = lambda y1, y2: y1 + (y2 - y1) * (dn - d1) / (d2 - d1)
    at = lambda b, key: lin(runs[(d1, b)][key], runs[(d2, b)][key])
    hbm = hbm_gib(topology)
    if per_chip:
        b, peak = per_chip, at(per_chip, "peak")
        flops = at(per_chip, "flops")
    else:
        p1, p2 = at(1, "peak"), at(2, "peak")
        slope = max(p2 - p1, 1.0)
        b = int((hbm * GIB - p1) // slope) + 1 if hbm else 2
        peak = p1 + (b - 1) * slope
        flops = at(1, "flops") + (b - 1) * (at(2, "flops") - at(1, "flops"))
    ref = runs[(d2, batches[-1])]
    mem = {k: lin(runs[(d1, batches[-1])]["memory"][k], ref["memory"][k]) for k in ref["memory"]}
    n = ref["devices"]
    return dict(per_chip_batch=max(b, 0), global_batch=max(b, 0) * n, devices=n, mesh=ref["mesh"], peak=peak,
                flops=flops, fits=hbm is None or (b >= 1 and peak <= hbm * GIB), seconds=sum(
                    r["seconds"] for r in runs.values()), extrapolated=f"depths {d1},{d2} -> {dn}",
                memory=mem if per_chip else {})


def report(r: dict, topology: str, phase: str) -> list[str]:
    hbm = hbm_gib(topology)
    gib = lambda x: f"{x / GIB:.3f} GiB"
    lines = [f"topology {topology}: {r['devices']} devices, mesh {r['mesh']}, global batch {r['global_batch']}, "
             f"compiled in {r['seconds']:.1f}s"]
    if r.get("extrapolated"):
        lines.append(f"  ESTIMATE: linear in the teacher's layers, compiled at {r['extrapolated']}")
        # Measured: FLOPs extrapolate exactly, the peak need not (the TPU compiler's memory
        # choices change with depth: MaskBit distill estimated 91.7 GiB on v6e:4x4, compiled
        # 16.8; estimated 14.6 on v5e:4x4, compiled 16.9).
        lines.append("  (FLOPs extrapolate exactly; the peak is a rough guide, off either way: confirm "
                     "with a full-depth compile, i.e. without --depths)")
    if "memory" in r:
        for k, v in r["memory"].items():
            lines.append(f"  per device {k:>15}: {gib(v)}")
    peak = r.get("peak")
    lines.append(f"  per device {'peak':>15}: {gib(peak) if peak else '?'} of "
                 f"{f'{hbm:.1f} GiB HBM' if hbm else 'host memory'} -> {'fits' if r['fits'] else 'DOES NOT FIT'}")
    if "oom" in r:
        lines.append(f"  compiler: {r['oom']}")
    flops = r.get("flops", float("nan"))
    if np.isfinite(flops):
        lines.append(f"  FLOPs per step: {flops / 1e9:.1f} GFLOP per device, {flops * r['devices'] / 1e12:.2f} "
                     f"TFLOP in all; {flops * r['devices'] / r['global_batch'] / 1e9:.1f} GFLOP per image")
    peak_gib = f"{peak / GIB:.3f}" if peak else "nan"
    lines.append(f"aot: topology={topology} phase={phase} per_chip_batch={r['per_chip_batch']} "
                 f"fits={'yes' if r['fits'] else 'no'} peak_gib={peak_gib} hbm_gib={f'{hbm:.1f}' if hbm else 'nan'} "
                 f"gflops_per_step={flops / 1e9:.1f}")
    return lines


def main(argv) -> int:
    if len(argv) > 1:
        raise BadInput(f"unexpected arguments: {' '.join(argv[1:])} — pass flags only")
    config = FLAGS.config
    if config is None:
        raise BadInput("--config is required — e.g. --config=configs/maskbit_imagenet256_distill.py")
    phase = FLAGS.phase or str(config.get("pipeline"))
    if phase not in PHASES:
        raise BadInput(f"--phase={phase!r} is not one of {PHASES} — pass --phase")
    if phase in ("gan", "reward") and phase not in config:
        raise BadInput(f"this config has no {phase!r} block — use its own phase or the {phase} config")
    topology = FLAGS.topology
    devices = topology_devices(topology, FLAGS.num_slices)
    if FLAGS.depths:
        try:
            d1, d2 = (int(x) for x in FLAGS.depths)
            assert 0 < d1 < d2
        except (ValueError, AssertionError):
            raise BadInput(f"--depths={','.join(FLAGS.depths)} must be two depths D1<D2, e.g. 2,4") from None
        per_chip = None if FLAGS.find_batch else (FLAGS.per_chip_batch or None)
        if per_chip is None and not FLAGS.find_batch:
            block = config.teacher.train if phase == "teacher" else config[phase]
            per_chip = max(1, int(block.batch_size) // len(devices))
        r = extrapolate(config, phase, devices, FLAGS.fsdp, topology, (d1, d2), per_chip)
    elif FLAGS.find_batch:
        r = find_batch(config, phase, devices, FLAGS.fsdp, topology)
    else:
        per_chip = FLAGS.per_chip_batch
        if per_chip <= 0:
            block = config.teacher.train if phase == "teacher" else config[phase]
            per_chip = max(1, int(block.batch_size) // len(devices))
        r = analyse(config, phase, devices, per_chip, FLAGS.fsdp, topology)
    print("\n".join(report(r, topology, phase)), flush=True)
    return 0


def entry(argv) -> int:
    try:
        return guarded("aot", lambda: main(argv))
    except RuntimeError as e:  # a compile failure other than an OOM (XlaRuntimeError)
        if debug_requested():
            raise
        print(f"aot: compiling the step failed: {' '.join(str(e).split())[:400]} — rerun with --debug",
              file=sys.stderr)
        return RunFailure.exit_code


def run() -> None:
    define_flags()
    remaining: list[str] = []

    def start() -> int:  # a bad --config file or override: one line, not absl's traceback
        argv = rewrite_config_arg(strip_debug(sys.argv), "aot")
        remaining.extend(parse_flags(argv))
        return 0

    rc = guarded("aot", start)
    if rc:
        sys.exit(rc)
    app.run(lambda argv: sys.exit(entry(argv)), flags_parser=lambda a: remaining)


if __name__ == "__main__":
    run()
