"""Benchmark of one Di[M]O distillation iteration (one generator + one auxiliary update).

  python bench/distill_step.py --config S      # LFQBert 256 wide, depth 4, 256 tokens, 14 bits, batch 8
  python bench/distill_step.py --config T      # 128 wide, depth 2, 64 tokens, 8 bits, batch 16
  python bench/distill_step.py --config FULL --dtype bfloat16 --batch 64   # real 14-bit MaskBit (accelerators)

Prints the compile time, the median seconds per iteration, images/s, peak RSS, the model
FLOPs of one iteration (XLA's cost analysis of the compiled step; an analytic count beside
it) and the fraction of a given peak (default 150 GFLOP/s: the issue's figure for a jitted
2048² fp32 matmul on the 2-core CPU box) and, on CPU, of that matmul timed beside the step
(287-333 GFLOP/s with jax 0.10.2). The last line is `distill_step_s=<median> images_per_s=<x>`.

With torch installed (`pip install -e '.[bench]'`), the same run also times our PyTorch
reference of the iteration (bench/torch_reference.py: MaskBit's LFQBert, eager fp32, in a
child process with its own peak RSS), alternating one JAX and one PyTorch iteration, and
the last line adds `speedup=<PyTorch median / ours>`. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

from reference_process import TorchReference, cpu_model, torch_available

CONFIGS = {
    "S": dict(hidden_dim=256, depth=4, heads=4, mlp_dim=1024, num_tokens=256, num_bits=14, splits=2, batch=8),
    "T": dict(hidden_dim=128, depth=2, heads=4, mlp_dim=512, num_tokens=64, num_bits=8, splits=2, batch=16),
    "FULL": dict(hidden_dim=1024, depth=24, heads=16, mlp_dim=4096, num_tokens=256, num_bits=14, splits=2, batch=64),
}


# glibc malloc setting of --lean: one arena (M_ARENA_MAX, the same as MALLOC_ARENA_MAX=1
# in the environment of any other command, e.g. the training CLI). A fixed 256 KiB mmap
# threshold or a 1 MiB trim threshold took ~30 MB more off the peak but cost S ~20%.
LEAN_MALLOC_OPTIONS = ((-8, 1),)


# --lean auto's threshold: S (3.6M parameters: five float32 copies in the state) has a
# memory target; T (0.56M) fits in cache-sized buffers and loses ~30% to the memory schedule.
LEAN_MIN_PARAMS = 2_000_000


def lfqbert_params(c, num_classes: int = 1000) -> int:
    """LFQBert's parameter count from a CONFIGS row (no jax needed)."""
    d, mlp, n = c["hidden_dim"], c["mlp_dim"], c["num_tokens"] + 1
    layer = (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 4 * d
    out = c["splits"] * 2 ** (c["num_bits"] // c["splits"])
    return (c["num_bits"] * d + d) + (num_classes + 1) * d + n * d + 2 * d + c["depth"] * layer \
        + (d * d + d) + 2 * d + (d * out + out)


def analytic_flops(c, batch: int) -> float:
    """Matmul FLOPs of one iteration: 10 forward-equivalents of the transformer
    (generator fwd+bwd 3, teacher cond+uncond 2, auxiliary target 1, fresh generator
    sample 1, auxiliary fwd+bwd 3)."""
    d, n, layers, mlp = c["hidden_dim"], c["num_tokens"] + 1, c["depth"], c["mlp_dim"]
    out = c["splits"] * 2 ** (c["num_bits"] // c["splits"])
    per_token = layers * (2 * 4 * d * d + 2 * 2 * d * mlp) + 2 * d * d + 2 * d * out + 2 * c["num_bits"] * d
    attn = layers * 2 * 2 * n * d  # QK^T and PV per token
    return 10.0 * batch * n * (per_token + attn)


def rss_now_mb() -> float:
    """Current resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def matmul_gflops(jax, jnp, n: int = 2048, reps: int = 10) -> float:
    """Median GFLOP/s of a jitted n x n float32 matmul on the default device."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def _malloc_trim() -> None:
    """Collect Python garbage and return glibc's free heap pages to the OS."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="S")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 5 for S/FULL, 20 for T)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.1, help="generator/auxiliary dropout (reference: 0.1)")
    ap.add_argument("--dropout_rng", choices=["threefry", "rbg", "unsafe_rbg"], default="threefry")
    ap.add_argument("--xla_option", action="append", default=[],
                    help="per-step XLA compiler option NAME=VALUE (repeatable), e.g. "
                         "xla_cpu_enable_concurrency_optimized_scheduler=false")
    ap.add_argument("--no_trim", dest="trim", action="store_false",
                    help="skip malloc_trim after compiling (glibc only)")
    ap.add_argument("--lean", choices=["auto", "on", "off"], default="auto",
                    help="memory settings for CPU runs: one malloc arena, XLA:CPU's "
                         "memory-optimised scheduler and serial code generation, and the init "
                         "programs dropped before the step is compiled. auto: on for a CPU "
                         "backend when the model has >= LEAN_MIN_PARAMS parameters (its state "
                         "then sets the peak); off on accelerators and for small models, where "
                         "it costs ~30%% and saves little")
    ap.add_argument("--no_lean", dest="lean", action="store_const", const="off", help="--lean=off")
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--num_devices", type=int, default=-1)
    ap.add_argument("--torch", choices=["auto", "off"], default="auto",
                    help="time the PyTorch reference in the same run (auto: when torch is installed)")
    ap.add_argument("--peak_gflops", type=float, default=150.0,
                    help="peak for the fraction-of-peak line (H100 bf16 dense: ~989000)")
    args = ap.parse_args(argv)
    c = dict(CONFIGS[args.config])
    # By the model and (below) the backend, never by the config's name. glibc's arena
    # setting must precede jax's threads, so it follows the size rule alone (harmless off CPU).
    args.lean = args.lean == "on" or (args.lean == "auto" and lfqbert_params(c) >= LEAN_MIN_PARAMS)
    if args.lean:
        # glibc malloc, set before jax starts its threads. One arena: the compiler's and
        # XLA's worker threads otherwise each keep an arena of freed blocks (S: ~100 MB
        # lower peak while compiling, ~2% slower steps).
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            for option, value in LEAN_MALLOC_OPTIONS:
                libc.mallopt(option, value)
        except (OSError, AttributeError):  # not glibc
            pass

    import jax
    import jax.numpy as jnp
    import numpy as np

    from softdimo_jax.models.maskbit_bert import LFQBert
    from softdimo_jax.runtime.mesh import make_mesh
    from softdimo_jax.core.adapters import make_adapter
    from softdimo_jax.core.defaults import default_distill_config
    from softdimo_jax.core.dimo import Distiller
    from softdimo_jax.pipelines.phases import distill_trainer, step_compiler_options

    if args.lean and jax.default_backend() != "cpu":
        args.lean = False  # XLA:CPU options: nothing to set on an accelerator
    batch = args.batch or c.pop("batch")
    c.pop("batch", None)
    iters = args.iters or (20 if args.config == "T" else 5)
    model = LFQBert(num_classes=1000, dropout=0.1, **c)
    cfg = default_distill_config()
    cfg.batch_size = batch
    cfg.dropout = args.dropout
    cfg.dropout_rng = args.dropout_rng
    cfg.compute_dtype = args.dtype
    cfg.remat = args.remat
    cfg.fsdp = args.fsdp

    rss = {"import": rss_now_mb()}
    t0 = time.perf_counter()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, c["num_tokens"], c["splits"]), jnp.int32),
                                 jnp.zeros((1,), jnp.int32))["params"]
    nparams = sum(x.size for x in jax.tree.leaves(params))
    mesh = make_mesh(None if args.num_devices < 1 else args.num_devices, args.fsdp)
    cfg.cpu_memory_schedule = bool(args.lean)
    opts = dict(step_compiler_options(cfg) or {})
    for item in args.xla_option:
        k, v = item.split("=", 1)
        opts[k] = {"true": True, "false": False}.get(v.lower(), v)
    d = Distiller(make_adapter(model, cfg), cfg, mesh)
    teacher = d.place_teacher(params)
    # The step exactly as a training run compiles it: the distill phase's Trainer
    # (runtime.trainer.jit_train_step: fold_in(seed, step) rng, donated state, shardings).
    trainer = distill_trainer(d, teacher, None, compiler_options=opts or None)
    state = d.init_state(teacher)
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0
    if args.lean:
        # The programs that built the state (model.init, placement, copies) are not needed
        # again: drop them and their heap before the step is compiled (~95 MB on S).
        del params
        jax.clear_caches()
        _malloc_trim()
    rss["init"] = rss_now_mb()

    # Class-label adapters draw their labels in the step: the batch is None.
    step_args = (None, jnp.asarray(0, jnp.int32), trainer.frozen)
    t0 = time.perf_counter()
    compiled = trainer.compiled_step().lower(state, *step_args).compile()
    t_compile = time.perf_counter() - t0
    rss_compile_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if args.trim:
        # Hand the compiler's freed heap back to the OS: XLA's step buffers are fresh
        # allocations, so without this the compiler's leftovers add to the run's peak RSS.
        _malloc_trim()
    rss["compile"] = rss_now_mb()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    try:
        mem = compiled.memory_analysis()
        temp_mb = getattr(mem, "temp_size_in_bytes", 0) / 2**20
        arg_mb = getattr(mem, "argument_size_in_bytes", 0) / 2**20
    except Exception:  # optional per backend
        temp_mb = arg_mb = float("nan")
    xla_flops = float((cost or {}).get("flops", 0.0)) * (1 if args.num_devices == 1 else 1)
    model_flops = analytic_flops(c, batch)

    state, m = compiled(state, *step_args)  # warm-up iteration
    jax.block_until_ready(m)
    ref = None
    if args.torch == "auto" and torch_available():
        # Started after our compile: its warm-up iteration runs while we wait.
        ref = TorchReference("dimo", dict(c, num_classes=1000, dropout=args.dropout), batch)
    times, cpu, ref_times = [], [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = compiled(state, *step_args)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if ref is not None:  # alternating: both see the same machine load
            ref_times.append(ref.time("step"))
    med = statistics.median(times)
    rss["run"] = rss_now_mb()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    devs = jax.devices()
    print(f"config {args.config}: {c}, batch {batch}, {nparams / 1e6:.2f}M params, dtype {args.dtype}, "
          f"remat {args.remat}, dropout {args.dropout} ({args.dropout_rng}), devices {len(mesh.devices.flat)}x {devs[0].device_kind}")
    print("memory settings (--lean): " + ("on (1 malloc arena, memory-optimised XLA:CPU schedule, "
                                           "serial codegen, init programs dropped)" if args.lean else "off"))
    print(f"init {t_init:.2f} s, compile {t_compile:.2f} s (peak RSS by then {rss_compile_peak:.0f} MB); "
          f"XLA options {opts or 'default'}")
    print(f"iterations: median {med:.4f} s, min {min(times):.4f} s, max {max(times):.4f} s over {iters}")
    # CPU seconds of this process per iteration: robust to other processes on a shared
    # machine (wall time is not); divided by the core count it bounds the unloaded wall time.
    print(f"process CPU time/iteration: median {statistics.median(cpu):.4f} s "
          f"({os.cpu_count()} cores visible)")
    print(f"peak RSS {rss_mb:.0f} MB (current after " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()) + " MB)")
    if devs[0].platform != "cpu":
        try:
            stats = devs[0].memory_stats() or {}
            print(f"peak device memory {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")
        except Exception:  # memory_stats is optional per backend
            pass
    print(f"XLA buffers of the step: arguments {arg_mb:.0f} MB, temporaries {temp_mb:.0f} MB")
    print(f"model FLOPs/iteration: analytic {model_flops / 1e9:.1f} GFLOP, XLA cost analysis "
          f"{xla_flops / 1e9:.1f} GFLOP")
    achieved = model_flops / med / 1e9
    print(f"achieved {achieved:.1f} GFLOP/s = {100 * achieved / args.peak_gflops:.1f}% of "
          f"{args.peak_gflops:g} GFLOP/s peak (analytic model FLOPs)")
    if devs[0].platform == "cpu":
        # The same reference product timed now: this machine's speed drifts by ~10% over
        # a day, so the fraction of a peak measured beside the step is the robust figure.
        mm = matmul_gflops(jax, jnp)
        print(f"a jitted 2048² fp32 matmul runs at {mm:.1f} GFLOP/s now: the step reached "
              f"{100 * achieved / mm:.1f}% of it")
    print(f"loss {float(m['loss']):.4f} fkl {float(m['fkl']):.4f} aux_loss {float(m['aux_loss']):.4f}")
    speedup = "nan"
    if ref is None:
        print("PyTorch reference not timed: " + ("--torch off" if args.torch == "off" else
                                                 "torch is not installed (pip install -e '.[bench]')"))
    else:
        ref_med, ref_rss = statistics.median(ref_times), ref.peak_rss_mb()
        ref.close()
        speedup = f"{ref_med / med:.2f}"
        print(f"PyTorch reference ({ref.banner[6:]}), alternating with ours: median {ref_med:.4f} s, "
              f"min {min(ref_times):.4f} s, max {max(ref_times):.4f} s over {iters}; peak RSS {ref_rss:.0f} MB")
        print(f"ours / PyTorch: time {med / ref_med:.3f} (speed-up {ref_med / med:.2f}x), "
              f"peak RSS {rss_mb / ref_rss:.3f}; load average {os.getloadavg()[0]:.2f} ({cpu_model()})")
    print(f"distill_step_s={med:.4f} images_per_s={batch / med:.2f} speedup={speedup}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
