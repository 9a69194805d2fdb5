"""Benchmark of one-step generation: the distilled generator's one forward + the tokenizer decoder.

  python bench/onestep_sample.py --config S   # LFQBert 256 wide, depth 4, 256 tokens, 14 bits in 2 splits;
                                              # MaskBit's 14-bit decoder (hidden 128, mult 1,1,2,2,4) at 256 px
  python bench/onestep_sample.py --config T   # the T generator (64 tokens, 8 bits), the decoder at 128 px

Ours: `softdimo_jax.sampling.api.make_batch_sampler(gen, "student", "hard")`, the function
`generate`, `sample` and `evaluate` call (one jitted program: initial state, generator,
categorical sample, decode, clip). Beside it, jitted generator-only (initial state +
forward + sample) and decoder-only (`ConvVQModel.decode_tokens`) programs.
PyTorch (bench/torch_reference.py, a child process, eager fp32, no_grad): LFQBert forward,
categorical sampling, combine_factorized_tokens, decode_tokens, with the JAX decoder's
weights (the run checks both decoders give the same images). Each op is timed
alternately, ours then PyTorch. Random weights: the speed does not depend on them.

Earlier lines: generator-only and decoder-only medians of both; the last line
`onestep_s=<median s per batch> images_per_s=<x> torch_images_per_s=<x> speedup=<x>`.
Not a test: run it by hand (about 2 minutes on a 2-core CPU for S).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from distill_step import CONFIGS
from reference_process import TorchReference, cpu_model, torch_available

DECODER = dict(hidden=128, channel_mult=(1, 1, 2, 2, 4), blocks=2)
BATCH = {"S": 4, "T": 4, "FULL": 4}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="S")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 4)")
    ap.add_argument("--iters", type=int, default=3, help="timed repetitions of each op")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--torch", choices=["auto", "off"], default="auto",
                    help="time the PyTorch path in the same run (auto: when torch is installed)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from softdimo_jax.models import lfq
    from softdimo_jax.models.maskbit_bert import LFQBert
    from softdimo_jax.models.maskbit_tokenizer import ConvVQModel
    from softdimo_jax.runtime import mesh as meshlib
    from softdimo_jax.sampling import api
    from softdimo_jax.sampling.student import one_step_logits

    c = {k: v for k, v in CONFIGS[args.config].items() if k != "batch"}
    batch = args.batch or BATCH[args.config]
    side = int(round(c["num_tokens"] ** 0.5))
    model = LFQBert(num_classes=1000, dropout=0.1, dtype=jnp.dtype(args.dtype), **c)
    tok = ConvVQModel(num_bits=c["num_bits"], hidden_channels=DECODER["hidden"],
                      channel_mult=DECODER["channel_mult"], num_res_blocks=DECODER["blocks"],
                      dtype=jnp.dtype(args.dtype))
    px = side * tok.downsample_factor
    t0 = time.perf_counter()
    gp = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, c["num_tokens"], c["splits"]), jnp.int32),
                             jnp.zeros((1,), jnp.int32))["params"]
    tp = jax.jit(lambda k: tok.init(k, jnp.zeros((1, side, side, c["num_bits"])),
                                    method=ConvVQModel.decode_bits))(jax.random.PRNGKey(1))["params"]
    gen = api.Generator("maskbit_generator", model, gp, tok, tp)
    api.check_generator(gen)
    mesh = meshlib.make_mesh()
    rep = meshlib.replicated(mesh)
    gp, tp = jax.device_put(gp, rep), jax.device_put(tp, rep)
    labels = meshlib.shard_batch(np.arange(batch, dtype=np.int32) * 7 % 1000, mesh)

    # The user-facing sampler, and its two halves as separate programs.
    full = api.make_batch_sampler(gen, "student", "hard", mesh=mesh)
    settings = gen.student_settings()
    adapter = gen.spec.adapter(model, args.dtype, settings)

    @jax.jit
    def gen_only(gp, rng, labels):
        k_in, k_out = jax.random.split(rng)
        z = one_step_logits(adapter, gp, k_in, labels, r_init=settings["r_init"],
                                sigma_init=settings["sigma_init"], init_mask_mode=settings["init_mask_mode"])
        sub = jax.random.categorical(k_out, z, axis=-1)
        return lfq.merge_splits(sub, c["num_bits"], c["splits"]).reshape(-1, side, side)

    # decode_tokens as the sampling API runs it (up-sampling folded, see ConvVQModel.fold_upsample).
    dec = tok.clone(fold_upsample=True)
    dec_only = jax.jit(lambda tp, ids: jnp.clip(dec.apply({"params": tp}, ids, method=ConvVQModel.decode_tokens), 0, 1))
    rng = jax.random.PRNGKey(0)
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = jax.block_until_ready(gen_only(gp, rng, labels))
    images = jax.block_until_ready(dec_only(tp, ids))
    jax.block_until_ready(full(gp, tp, rng, labels))
    t_compile = time.perf_counter() - t0

    ops = {"gen": lambda: jax.block_until_ready(gen_only(gp, rng, labels)),
           "dec": lambda: jax.block_until_ready(dec_only(tp, ids)),
           "full": lambda: jax.block_until_ready(full(gp, tp, rng, labels))}
    ref = None
    if args.torch == "auto" and torch_available():
        tmp = tempfile.mkdtemp(prefix="onestep_bench_")
        flat = {"/".join(str(k.key) for k in path): np.asarray(x)
                for path, x in jax.tree_util.tree_leaves_with_path(tp["decoder"])}
        np.savez(os.path.join(tmp, "decoder.npz"), **flat)
        ref_cfg = {"generator": dict(c, num_classes=1000, dropout=0.1), "decoder": DECODER, "batch": batch}
        ref = TorchReference("onestep", ref_cfg, os.path.join(tmp, "decoder.npz"))
        np.savez(os.path.join(tmp, "ids.npz"), ids=np.asarray(ids))
        ref.ask("check", os.path.join(tmp, "ids.npz"), os.path.join(tmp, "images.npy"))
        diff = float(np.max(np.abs(np.load(os.path.join(tmp, "images.npy")) - np.asarray(images))))
        print(f"same decoder: max |ours - PyTorch| over the {batch} images = {diff:.2e}")
    ours = {k: [] for k in ops}
    theirs = {k: [] for k in ops}
    for _ in range(args.iters):
        for k, fn in ops.items():  # alternating: ours, then PyTorch, op by op
            ours[k].append(_timed(fn))
            if ref is not None:
                theirs[k].append(ref.time(k))
    med = {k: statistics.median(v) for k, v in ours.items()}
    print(f"config {args.config}: generator {c}, decoder {DECODER} at {px} px, batch {batch}, dtype {args.dtype}, "
          f"{jax.default_backend()} ({cpu_model()}), {jax.device_count()} device(s)")
    print(f"setup {t_setup:.2f} s, compile (three programs) {t_compile:.2f} s")
    print(f"generator only (initial state, forward, sample): median {med['gen']:.4f} s")
    print(f"decoder only (decode_tokens, clip): median {med['dec']:.4f} s")
    speedup, torch_ips = float("nan"), float("nan")
    if ref is not None:
        tmed = {k: statistics.median(v) for k, v in theirs.items()}
        print(f"PyTorch ({ref.banner[6:]}): generator only {tmed['gen']:.4f} s, decoder only {tmed['dec']:.4f} s, "
              f"one step {tmed['full']:.4f} s (medians over {args.iters}); peak RSS {ref.peak_rss_mb():.0f} MB")
        ref.close()
        print(f"speed-up: generator {tmed['gen'] / med['gen']:.2f}x, decoder {tmed['dec'] / med['dec']:.2f}x; "
              f"load average {os.getloadavg()[0]:.2f}")
        speedup, torch_ips = tmed["full"] / med["full"], batch / tmed["full"]
    else:
        print("PyTorch path not timed: " + ("--torch off" if args.torch == "off" else
                                            "torch is not installed (pip install -e '.[bench]')"))
    print(f"onestep_s={med['full']:.4f} images_per_s={batch / med['full']:.3f} "
          f"torch_images_per_s={torch_ips:.3f} speedup={speedup:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
