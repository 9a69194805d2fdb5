"""Benchmark of a text-to-image reward's forward + backward w.r.t. the image.

  python bench/reward_step.py                      # HPS v2 (OpenCLIP ViT-H-14), 224 px, batch 1
  python bench/reward_step.py --batch 4 --size 256 # decoder-sized input: resize + crop inside
  python bench/reward_step.py --model L14          # CLIP score's ViT-L-14

Random weights (the cost does not depend on them). The step is exactly the reward path of
fine-tuning and TTEO: images (B, S, S, 3) in [0, 1] → differentiable preprocessing (224 px,
CLIP mean/std) → image tower → cosine with fixed normalised text features → sum, and its
gradient w.r.t. the images (the text side is computed once per prompt, not per step).
Prints the compile time, the median seconds per step, images/s, peak RSS and the FLOPs per
image of the compiled step (XLA's cost analysis) beside an analytic matmul count. Not a
test: run it by hand (under `nice` on a shared machine).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.conversion.clip import openclip_defaults, openclip_vit_l_14_overrides
from softdimo_jax.core.t2i_reward import image_features
from softdimo_jax.models.clip import CLIP, ClipVisionTransformer, clip_vision_tower, l2_normalize

MODELS = {"H14": {}, "L14": openclip_vit_l_14_overrides()}


def analytic_flops(m: CLIP) -> float:
    """Matmul FLOPs of forward + backward of the image tower, per image. The gradient is
    w.r.t. the input only (frozen weights: no weight gradients), so backward ≈ 1× forward."""
    n = (m.image_size // m.patch_size) ** 2 + 1
    w, h = m.vision_width, int(m.vision_width * m.vision_mlp_ratio)
    per_layer = n * (2 * 4 * w * w + 2 * 2 * w * h) + 2 * 2 * n * n * w
    patch = (n - 1) * 2 * 3 * m.patch_size ** 2 * w
    return 2.0 * (m.vision_layers * per_layer + patch + 2 * w * m.embed_dim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="H14")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224, help="input image side (resized to 224 inside)")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    m = CLIP(**{**openclip_defaults(), **MODELS[args.model]})
    tower: ClipVisionTransformer = clip_vision_tower(m)
    x0 = jnp.zeros((1, m.image_size, m.image_size, 3))
    params = jax.jit(tower.init)(jax.random.PRNGKey(0), x0)["params"]
    n_params = sum(np.size(p) for p in jax.tree.leaves(params))
    txt = l2_normalize(jax.random.normal(jax.random.PRNGKey(1), (args.batch, m.embed_dim)))
    images = jax.random.uniform(jax.random.PRNGKey(2), (args.batch, args.size, args.size, 3))

    def reward_sum(x, p, t):
        f = l2_normalize(image_features(m, p, x, crop="torchvision"))
        return jnp.sum(f * t)

    step = jax.jit(jax.value_and_grad(reward_sum))
    t0 = time.time()
    compiled = step.lower(images, params, txt).compile()
    compile_s = time.time() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    times = []
    for _ in range(args.steps):
        t0 = time.time()
        v, g = compiled(images, params, txt)
        jax.block_until_ready(g)
        times.append(time.time() - t0)
    med = statistics.median(times)
    assert bool(jnp.all(jnp.isfinite(g)))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model={args.model} image tower {n_params / 1e6:.1f}M params, batch={args.batch}, input {args.size} px")
    print(f"compile_s={compile_s:.1f} step_s={med:.3f} (all: {', '.join(f'{t:.2f}' for t in times)}) "
          f"peak_rss_mb={rss:.0f}")
    print(f"flops_per_image_xla={xla_flops / args.batch:.4g} flops_per_image_analytic={analytic_flops(m):.4g}")
    print(f"reward_step_s={med:.3f} images_per_s={args.batch / med:.3f}")


if __name__ == "__main__":
    main()
