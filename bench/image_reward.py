"""Throughput of ImageReward as a training reward: forward + backward to the images of the
full-size model (BLIP ViT-L/16 at 224 + BERT-base cross-encoder + head), from [0, 1] images
through the differentiable preprocessing, prompts padded to 35 tokens.

    python bench/image_reward.py                       # batch 2, 256×256 inputs
    python bench/image_reward.py --batch 8 --iters 5 --size 224 --remat

Weights are random (shapes of the released model; the speed does not depend on them). Prints
the compiled step's FLOPs per image (XLA cost analysis) and `image_reward_images_per_s=<x>`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.blip import image_reward_defaults
from softdimo_jax.core.image_reward import image_reward
from softdimo_jax.models.blip import ImageReward, image_reward_expected_params


def random_params(model: ImageReward, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)),
                        image_reward_expected_params(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="input image side (resized to 224 inside)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--remat", action="store_true")
    args = ap.parse_args()

    model = ImageReward(**image_reward_defaults(), remat=args.remat)
    params = jax.device_put(random_params(model))
    images = jax.random.uniform(jax.random.PRNGKey(0), (args.batch, args.size, args.size, 3))
    ids = np.zeros((args.batch, 35), np.int32)
    ids[:, :12] = np.arange(100, 112)
    mask = (ids != 0).astype(np.int32)

    def loss(params, x):
        return jnp.sum(image_reward(model, params, x, ids, mask))

    step = jax.jit(jax.value_and_grad(loss, argnums=1))
    t0 = time.perf_counter()
    compiled = step.lower(params, images).compile()
    print(f"compile_s={time.perf_counter() - t0:.1f}")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
        print(f"gflops_per_image={cost['flops'] / args.batch / 1e9:.1f} (forward + backward to the images)")
    jax.block_until_ready(compiled(params, images))  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.iters):
        jax.block_until_ready(compiled(params, images))
    dt = (time.perf_counter() - t0) / args.iters
    print(f"seconds_per_step={dt:.3f} batch={args.batch} devices={jax.device_count()} "
          f"backend={jax.default_backend()}")
    print(f"image_reward_images_per_s={args.batch / dt:.3f}")


if __name__ == "__main__":
    main()
