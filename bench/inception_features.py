"""Throughput of the FID Inception feature extractor (images/s), end to end: uint8 host
batch → sharded device forward (pool features + unbiased logits) → host float32.

    python bench/inception_features.py                      # batch 64, 299×299, all devices
    python bench/inception_features.py --batch 256 --iters 20 --precision default

Weights are random (shapes of the published network) unless --checkpoint is given; the
speed does not depend on them. Prints `inception_images_per_s=<x>`.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.conversion.inception import inception_expected_params, load_inception
from softdimo_jax.evaluation.fid import InceptionFeatureExtractor
from softdimo_jax.models.inception import FIDInceptionV3


def random_params(model: FIDInceptionV3, seed: int = 0):
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == "var":
            return np.ones(x.shape, np.float32)
        if name == "kernel":
            fan_in = int(np.prod(x.shape[:-1]))
            return (rng.normal(size=x.shape) / np.sqrt(fan_in)).astype(np.float32)
        return (0.01 * rng.normal(size=x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, inception_expected_params(model))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=299, help="input image side (uint8)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--num-devices", type=int)
    p.add_argument("--precision", choices=["highest", "default"], default="highest")
    p.add_argument("--checkpoint")
    args = p.parse_args()

    precision = None if args.precision == "default" else "highest"
    model = FIDInceptionV3(precision=precision)
    params = load_inception(args.checkpoint, model) if args.checkpoint else random_params(model)
    mesh = meshlib.make_mesh(args.num_devices)
    ex = InceptionFeatureExtractor(params, mesh=mesh, batch_size=args.batch, model=model)
    images = np.random.default_rng(1).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)

    t = time.perf_counter()
    ex(images)  # compile + first run
    compile_s = time.perf_counter() - t
    batches = [images] * args.iters
    t = time.perf_counter()
    n = sum(len(f["2048"]) for f in ex.iter_features(batches))  # pipelined, as in evaluation
    dt = time.perf_counter() - t
    rate = n / dt
    print(f"device={jax.devices()[0].device_kind} x{mesh.size} batch={args.batch} size={args.size} "
          f"precision={args.precision} iters={args.iters} compile+first={compile_s:.1f}s")
    print(f"inception_images_per_s={rate:.2f}")


if __name__ == "__main__":
    main()
