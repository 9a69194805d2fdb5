"""One real full-size Soft-Di[M]O distillation step on this CPU, against XLA's memory prediction.

  nice -n 10 python bench/full_size_step.py [--batch 1] [--iters 2] [--set distill.remat=False ...]

Builds the distillation phase of configs/maskbit_imagenet256_distill.py (the released 14-bit
MaskBit: teacher, generator θ and auxiliary ψ of 304.93M parameters each, bf16 compute over
float32 master weights, remat) exactly as a run does — `pipelines.phases.distill_trainer`
over one CPU device, the Trainer's one jit site (`runtime.trainer.jit_train_step`: donated
state, the config's XLA options) — with a randomly initialised teacher (no weights are read),
compiles its step, then runs it for real.

Memory: `compiled.memory_analysis()` gives the step's buffers (arguments + outputs − aliased
+ temporaries). The prediction of the peak RSS while stepping adds the runtime baseline: the
process's RSS just before the first step less the bytes of the live arrays (jax, XLA, the
loaded executable, Python). The measured peak is VmHWM reset (/proc/self/clear_refs) after
compiling, so the compiler's own peak (printed separately) does not count.

Last line: `full_size_step_s=<median s/iter> peak_rss_gib=<stepping> predicted_gib=<prediction>`.
Needs ~16 GiB of free memory at batch 1 (the state alone is ~10 GiB); after compiling it checks
/proc/meminfo's MemAvailable and stops with the prediction if the step cannot fit
(--force runs anyway). The compiled step is kept in a persistent compilation cache
(--cache_dir), so a rerun skips the ~8 min compile. Not a test: run by hand.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import pathlib
import resource
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs.maskbit_imagenet256_distill import get_config  # noqa: E402
from softdimo_jax import aot  # noqa: E402
from softdimo_jax.core.adapters import make_adapter  # noqa: E402
from softdimo_jax.core.dimo import Distiller  # noqa: E402
from softdimo_jax.pipelines import phases  # noqa: E402
from softdimo_jax.runtime import mesh as meshlib  # noqa: E402

GIB = 2**30


def proc_status(key: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024.0
    return float("nan")


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0: '5' to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_meminfo(key: str) -> float:
    """A /proc/meminfo field (MemAvailable) in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024.0
    return float("nan")


def malloc_trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="global batch (1-2 fit in ~16 GiB)")
    ap.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up iteration")
    ap.add_argument("--depth", type=int, default=0, help="teacher layers (0: the released 24; a smoke check of the script)")
    ap.add_argument("--set", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                    help="config override, e.g. distill.remat=False (repeatable)")
    ap.add_argument("--margin_gib", type=float, default=0.5, help="memory to leave to the machine's other users")
    ap.add_argument("--force", action="store_true", help="run even if MemAvailable says it will not fit")
    ap.add_argument("--cache_dir", default="/tmp/softdimo_full_size_jax_cache",
                    help="JAX persistent compilation cache: a rerun skips the ~8 min compile ('' disables)")
    args = ap.parse_args(argv)
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if jax.default_backend() != "cpu":
        print("error: this benchmark measures the CPU target — run with JAX_PLATFORMS=cpu", file=sys.stderr)
        return 2

    config = get_config().copy_and_resolve_references()
    dcfg = config.distill
    dcfg.batch_size = args.batch
    dcfg.fsdp = 1
    for item in args.set:
        key, _, value = item.partition("=")
        block, _, name = key.partition(".")
        config[block][name] = parse_value(value)
    mesh = meshlib.make_mesh(1, fsdp=1)
    free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB

    t0 = time.perf_counter()
    model, abstract = aot.teacher_model(config, args.depth or None)  # released size: 304.93M parameters
    n_tokens, splits = int(model.num_tokens), int(model.splits)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, n_tokens, splits), jnp.int32),
                                 jnp.zeros((1,), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    nparams = sum(x.size for x in jax.tree.leaves(params))
    distiller = Distiller(make_adapter(model, dcfg), dcfg, mesh)
    trainer = phases.distill_trainer(distiller, params, None, compiler_options=phases.step_compiler_options(dcfg))
    del params
    t_init = time.perf_counter() - t0

    # Compile against the abstract state: only the teacher is allocated while XLA compiles.
    step_args = (None, jnp.asarray(0, jnp.int32), trainer.frozen)
    t0 = time.perf_counter()
    compiled = trainer.compiled_step().lower(trainer.abstract_state(), *step_args).compile()
    t_compile = time.perf_counter() - t0
    compile_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    ma = compiled.memory_analysis()
    mem = dict(arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
               aliased=ma.alias_size_in_bytes, temporaries=ma.temp_size_in_bytes,
               generated_code=ma.generated_code_size_in_bytes)
    step_bytes = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", float("nan")))

    g = lambda x: f"{x / GIB:.2f} GiB"
    print(f"compile {t_compile:.1f} s (peak RSS while compiling {g(compile_peak)}); memory_analysis: "
          + ", ".join(f"{k} {g(v)}" for k, v in mem.items()), flush=True)

    jax.clear_caches()  # the init programs; the compiled step is held by `compiled`
    malloc_trim()
    # Will it fit? The state (the step's arguments less the teacher, allocated already) and
    # the step's new buffers, against what the machine has free now (shared hosts: measured).
    need = step_bytes - live_bytes()
    avail = proc_meminfo("MemAvailable")
    print(f"before the state exists: RSS {g(proc_status('VmRSS'))}, {g(live_bytes())} of live arrays; the step "
          f"needs {g(need)} more; MemAvailable {g(avail)}", flush=True)
    if need > avail - args.margin_gib * GIB and not args.force:
        print(f"error: the full-size step needs {g(need)} more than this process holds, the machine has "
              f"{g(avail)} available (margin {args.margin_gib} GiB) — free memory or pass --force", file=sys.stderr)
        print(f"full_size_step_s=nan peak_rss_gib=nan predicted_gib="
              f"{(proc_status('VmRSS') - live_bytes() + step_bytes) / GIB:.2f}")
        return 1
    state = trainer.init_state()
    jax.block_until_ready(state)
    malloc_trim()
    rss_before = proc_status("VmRSS")
    baseline = rss_before - live_bytes()
    predicted = baseline + step_bytes
    hwm_reset = reset_peak_rss()

    times, cpu = [], []
    for i in range(args.iters + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = compiled(state, *step_args[:1], jnp.asarray(i, jnp.int32), step_args[2])
        jax.block_until_ready((state, m))
        if i:  # the first iteration is the warm-up
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = proc_status("VmHWM") if hwm_reset else float("nan")
    med = statistics.median(times)
    loss = {k: float(m[k]) for k in ("loss", "fkl", "aux_loss") if k in m}
    assert all(np.isfinite(v) for v in loss.values()), loss

    print(f"MaskBit 14-bit Soft-Di[M]O distillation (configs/maskbit_imagenet256_distill.py): "
          f"{nparams / 1e6:.2f}M parameters per model (teacher, θ, ψ; plus EMA and two Adam states), "
          f"depth {model.depth}, batch {args.batch}, compute {dcfg.compute_dtype}, remat {dcfg.remat}, 1 CPU device, "
          f"{os.cpu_count()} cores; {free_gib:.1f} GiB free at start")
    print(f"init {t_init:.1f} s, compile {t_compile:.1f} s (peak RSS while compiling {g(compile_peak)}), "
          f"XLA options {phases.step_compiler_options(dcfg) or 'default'}")
    print(f"runtime baseline (RSS before the first step {g(rss_before)} less {g(live_bytes())} of live arrays): "
          f"{g(baseline)}")
    print(f"predicted peak = baseline + arguments + outputs - aliased + temporaries = {g(predicted)}")
    print(f"measured peak RSS while stepping {g(peak)} ({100 * (peak - predicted) / predicted:+.1f}% vs predicted)")
    print(f"iterations: median {med:.2f} s, min {min(times):.2f} s, max {max(times):.2f} s over {len(times)} "
          f"(+1 warm-up); process CPU time median {statistics.median(cpu):.2f} s; "
          f"XLA cost analysis {flops / 1e9:.0f} GFLOP/iteration = {flops / med / 1e9:.0f} GFLOP/s")
    print("last metrics: " + " ".join(f"{k} {v:.4f}" for k, v in loss.items()))
    print(f"full_size_step_s={med:.2f} peak_rss_gib={peak / GIB:.2f} predicted_gib={predicted / GIB:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
