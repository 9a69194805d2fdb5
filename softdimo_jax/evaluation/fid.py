"""FID / IS / precision-recall at scale: a sharded, jitted Inception feature extractor and a
streaming driver.

    params = load_inception("pt_inception-2015-12-05-6726825d.pth")
    extractor = InceptionFeatureExtractor(params, mesh=make_mesh())
    reference = load_reference("VIRTUAL_imagenet256_labeled.npz", extractor=extractor)
    metrics = evaluate_images(sample_batches, reference, extractor, num_images=50_000)

The network runs on the mesh (params replicated and passed as an argument, the batch split
over every device); only the 2048-d pool features and the 1008-d unbiased logits come back
to the host, where the mean/covariance are accumulated in float64 (StreamingMoments), so
the images never sit in memory at once. IS uses the unbiased logits (torch-fidelity's
convention), precision/recall the pool features (k = 3).

Multi-host: every process passes its own local images (batch_size / process_count each);
outputs are gathered so that every process gets the global features. (Exercised here on
one process only.)
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.evaluation import stats
from softdimo_jax.runtime.artifacts import log as log_line
from softdimo_jax.models.inception import FIDInceptionV3

POOL, LOGITS = "2048", "logits_unbiased"


def to_uint8(images) -> np.ndarray:
    """NHWC images → uint8. uint8 passes through; floats are read as [0, 1], clipped and
    rounded (x·255 rounded to nearest), the quantisation every saved sample goes through."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"expected NHWC RGB images (N, H, W, 3), got shape {x.shape}; move channels last "
            "(x.transpose(0, 2, 3, 1)) or repeat grey images to 3 channels"
        )
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], got {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or inf; the sampler or decoder produced invalid values")
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _fmt_secs(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class Progress:
    """Prints `desc: done/total, rate, elapsed, ETA` at most every `every_secs` (and at the end)."""

    def __init__(self, total: int | None, desc: str = "inception", *, every_secs: float = 30.0,
                 log: Callable[[str], None] | None = log_line):
        self.total, self.desc, self.every_secs, self.log = total, desc, every_secs, log
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if self.log is not None and (finished or now - self._last >= self.every_secs):
            self._last = now
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.start
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        msg = f"{self.desc}: {self.done}"
        if self.total:
            msg += f"/{self.total} ({100.0 * self.done / self.total:.0f}%)"
        msg += f", {rate:.1f} img/s, elapsed {_fmt_secs(elapsed)}"
        if self.total and rate > 0:
            msg += f", ETA {_fmt_secs(max(self.total - self.done, 0) / rate)}"
        return msg


@functools.lru_cache(maxsize=16)
def _sharded_forward(model: FIDInceptionV3, mesh) -> Callable:
    """One jitted forward per (model, mesh): params replicated, batch split over the mesh."""

    def forward(params, images):
        return model.apply({"params": params}, images)

    return jax.jit(
        forward,
        in_shardings=(meshlib.replicated(mesh), meshlib.batch_sharding(mesh, 4)),
        out_shardings=meshlib.batch_sharding(mesh, 2),
    )


class InceptionFeatureExtractor:
    """Images (uint8, or float in [0, 1]; NHWC of any size) → Inception features on the host.

    Args:
      params: converted FID Inception params (conversion/inception.py).
      mesh: a softdimo_jax.runtime.mesh mesh (default: every device).
      batch_size: global images per device call; a multiple of the mesh size (default
        32 per device). Short batches are padded, and the padding is dropped again.
      features: which outputs to return (default pool features + unbiased logits).
      precision: "highest" (default) keeps convolutions in full float32 on TPU/GPU, whose
        default bf16/TF32 passes shift FID; None uses JAX's default (faster).
      model: a ready FIDInceptionV3 (then `features` and `precision` are its own).
    """

    def __init__(self, params: Any, *, mesh=None, batch_size: int | None = None,
                 features: tuple[str, ...] = (POOL, LOGITS), precision: Any = "highest",
                 model: FIDInceptionV3 | None = None):
        self.mesh = meshlib.make_mesh() if mesh is None else mesh
        self.model = model or FIDInceptionV3(features=tuple(features), precision=precision)
        self.batch_size = int(batch_size or 32 * self.mesh.size)
        meshlib.check_batch_divisible(self.batch_size, self.mesh)
        if self.batch_size % jax.process_count():
            raise ValueError(f"batch size {self.batch_size} must divide over {jax.process_count()} processes")
        self.local_batch_size = self.batch_size // jax.process_count()
        self.params = jax.device_put(params, meshlib.replicated(self.mesh))
        self._forward = _sharded_forward(self.model, self.mesh)

    def _dispatch(self, images: np.ndarray):
        """Starts the device computation for one local batch (≤ local_batch_size); async."""
        x = to_uint8(images)
        n = len(x)
        if n > self.local_batch_size:
            raise ValueError(f"batch of {n} images exceeds the extractor's batch ({self.local_batch_size})")
        if n < self.local_batch_size:  # fixed shapes: one compilation
            x = np.concatenate([x, np.zeros((self.local_batch_size - n, *x.shape[1:]), np.uint8)])
        sharding = meshlib.batch_sharding(self.mesh, 4)
        global_x = jax.make_array_from_process_local_data(sharding, x, (self.batch_size, *x.shape[1:]))
        return self._forward(self.params, global_x), n

    def _fetch(self, pending) -> dict[str, np.ndarray]:
        out, n = pending
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
            # Every process padded its own slice; keep only the real rows of each.
            per = self.local_batch_size
            counts = multihost_utils.process_allgather(np.asarray([n]))
            rows = np.concatenate([np.arange(p * per, p * per + int(c)) for p, c in enumerate(np.ravel(counts))])
            return {k: np.asarray(v, np.float32)[rows] for k, v in out.items()}
        return {k: np.asarray(v, np.float32)[:n] for k, v in out.items()}

    def __call__(self, images) -> dict[str, np.ndarray]:
        """Features of one batch (at most `local_batch_size` images)."""
        return self._fetch(self._dispatch(images))

    def iter_features(self, batches: Iterable[Any], *, num_images: int | None = None,
                      progress: Progress | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Features for a stream of image batches of any size, rebatched to the extractor's
        batch; the next batch is dispatched before the previous one is fetched, so host
        work overlaps the device. Stops after `num_images` (local) images if given."""
        pending = None
        remaining = num_images
        for chunk in _rebatch(batches, self.local_batch_size):
            if remaining is not None:
                if remaining <= 0:
                    break
                chunk = chunk[:remaining]
                remaining -= len(chunk)
            current = self._dispatch(chunk)
            if pending is not None:
                feats = self._fetch(pending)
                if progress is not None:
                    progress.update(len(next(iter(feats.values()))))
                yield feats
            pending = current
        if pending is not None:
            feats = self._fetch(pending)
            if progress is not None:
                progress.update(len(next(iter(feats.values()))))
            yield feats


def _rebatch(batches: Iterable[Any], size: int) -> Iterator[np.ndarray]:
    """Re-chunks a stream of (n_i, H, W, 3) arrays (or one big array) into batches of `size`."""
    if isinstance(batches, np.ndarray) or hasattr(batches, "shape"):
        arr = batches
        for i in range(0, len(arr), size):
            yield np.asarray(arr[i : i + size])
        return
    buf: list[np.ndarray] = []
    held = 0
    for b in batches:
        b = to_uint8(np.asarray(b))
        while len(b):
            take = min(size - held, len(b))
            buf.append(b[:take])
            held += take
            b = b[take:]
            if held == size:
                yield np.concatenate(buf) if len(buf) > 1 else buf[0]
                buf, held = [], 0
    if held:
        yield np.concatenate(buf)


class ActivationSet:
    """Host-side accumulation of extractor outputs: streaming float64 moments of the pool
    features, and (optionally) the raw pool features for precision/recall and the logits
    for IS, kept as float32."""

    def __init__(self, *, keep_pool: bool = True, keep_logits: bool = True, max_pool: int | None = None,
                 dim: int = 2048):
        self.moments = stats.StreamingMoments(dim)
        self.keep_pool, self.keep_logits, self.max_pool = keep_pool, keep_logits, max_pool
        self._pool: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []
        self._kept_pool = 0

    def update(self, feats: Mapping[str, np.ndarray]) -> None:
        pool = np.asarray(feats[POOL], np.float32)
        self.moments.update(pool)
        if self.keep_pool:
            room = len(pool) if self.max_pool is None else max(self.max_pool - self._kept_pool, 0)
            if room:
                self._pool.append(pool[:room])
                self._kept_pool += len(pool[:room])
        if self.keep_logits and LOGITS in feats:
            self._logits.append(np.asarray(feats[LOGITS], np.float32))

    @property
    def n(self) -> int:
        return self.moments.n

    @property
    def mu(self) -> np.ndarray:
        return self.moments.mean

    @property
    def sigma(self) -> np.ndarray:
        return self.moments.cov

    @property
    def pool(self) -> np.ndarray | None:
        return np.concatenate(self._pool) if self._pool else None

    @property
    def logits(self) -> np.ndarray | None:
        return np.concatenate(self._logits) if self._logits else None


def compute_activations(images: Any, extractor: InceptionFeatureExtractor, *, num_images: int | None = None,
                        keep_pool: bool = True, keep_logits: bool = True, max_pool: int | None = None,
                        desc: str = "inception", log: Callable[[str], None] | None = log_line,
                        every_secs: float = 30.0) -> ActivationSet:
    """Runs the extractor over `images` (an (N, H, W, 3) array, or an iterable of batches)."""
    total = num_images if num_images is not None else (len(images) if hasattr(images, "shape") else None)
    progress = Progress(total, desc, every_secs=every_secs, log=log)
    acts = ActivationSet(keep_pool=keep_pool, keep_logits=keep_logits, max_pool=max_pool)
    for feats in extractor.iter_features(images, num_images=num_images, progress=progress):
        acts.update(feats)
    if num_images is not None and acts.n < num_images:
        raise ValueError(f"{desc}: the image source ended after {acts.n} of {num_images} images")
    if acts.n < 2:
        raise ValueError(f"{desc}: FID needs at least 2 images, got {acts.n}")
    return acts


def frechet_distance_lowrank(mu1, sigma1, mu2, feats2) -> float:
    """Fréchet distance when the second Gaussian is the sample moments of few (n < D) feature
    vectors: with A the centred features, S2 = AᵀA/(n−1) and the non-zero eigenvalues of
    S1·S2 are those of the n×n matrix A·S1·Aᵀ/(n−1), so no D×D decomposition is needed."""
    x = np.asarray(feats2, np.float64)
    n = len(x)
    a = x - x.mean(axis=0)
    m = (a @ np.asarray(sigma1, np.float64) @ a.T) / (n - 1)
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    tr2 = np.sum(a * a) / (n - 1)
    return float(max(diff @ diff + np.trace(sigma1) + tr2 - 2 * tr_covmean, 0.0))


def fid_against_reference(fake: "ActivationSet", reference) -> float:
    """FID of accumulated activations against reference statistics. Same value as
    stats.frechet_distance; cheaper: few samples (n < D) use the n×n form, otherwise the
    reference's square root is computed once and only an eigvalsh per evaluation remains."""
    pool = fake.pool
    if pool is not None and len(pool) == fake.n and fake.n < len(reference.mu):
        return frechet_distance_lowrank(reference.mu, reference.sigma, fake.mu, pool)
    sqrt_ref = reference.sqrt_sigma() if hasattr(reference, "sqrt_sigma") else None
    if sqrt_ref is None:
        return stats.frechet_distance(fake.mu, fake.sigma, reference.mu, reference.sigma)
    s_fake = fake.sigma
    m = sqrt_ref @ s_fake @ sqrt_ref
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
    diff = fake.mu - reference.mu
    return float(max(diff @ diff + np.trace(reference.sigma) + np.trace(s_fake) - 2 * tr_covmean, 0.0))


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_radii_block(queries, points, k: int):
    d = _sq_dists_f32(queries, points)
    return jnp.sqrt(-jax.lax.top_k(-d, k + 1)[0][:, k])  # k-th neighbour after self


@jax.jit
def _count_inside_block(queries, points, radii):
    d = jnp.sqrt(_sq_dists_f32(queries, points))
    return jnp.sum(jnp.any(d <= radii[None, :], axis=1))


def _sq_dists_f32(a, b):
    ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] - 2 * ab + jnp.sum(b * b, 1)[None, :], 0.0)


def precision_recall_device(real_feats, fake_feats, k: int = 3, block: int = 2048) -> tuple[float, float]:
    """stats.precision_recall on the accelerator in float32 (as the ADM evaluator does), in
    (block, N) slabs: seconds instead of minutes for 50k×50k. Borderline neighbours may
    flip versus the float64 host version."""
    real = jnp.asarray(np.asarray(real_feats, np.float32))
    fake = jnp.asarray(np.asarray(fake_feats, np.float32))
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")

    def radii(x):
        return jnp.concatenate([_knn_radii_block(x[i : i + block], x, k) for i in range(0, len(x), block)])

    def inside(q, pts, r):
        return sum(int(_count_inside_block(q[i : i + block], pts, r)) for i in range(0, len(q), block)) / len(q)

    r_real, r_fake = radii(real), radii(fake)
    return float(inside(fake, real, r_real)), float(inside(real, fake, r_fake))


def compute_metrics(fake: ActivationSet, reference, *, is_splits: int = 10, pr_k: int = 3,
                    compute_pr: bool = True, pr_block: int = 1024, pr_backend: str = "auto") -> dict[str, float]:
    """FID (vs reference mu/sigma), IS (fake unbiased logits) and, when both sides kept
    pool features, improved precision/recall. `pr_backend`: "host" (float64 numpy),
    "device" (float32 on the accelerator) or "auto" (device unless JAX runs on CPU).

    IS splits are contiguous chunks in sample order, as in the ADM evaluator: generate with
    export.class_balanced_labels (interleaved classes), not class-major order."""
    out: dict[str, float] = {"num_samples": float(fake.n)}
    out["fid"] = fid_against_reference(fake, reference)
    logits = fake.logits
    if logits is not None:
        out["inception_score"], out["inception_score_std"] = stats.inception_score(logits, splits=is_splits)
    ref_feats = getattr(reference, "features", None)
    if compute_pr and ref_feats is not None and fake.pool is not None:
        if pr_backend not in ("auto", "host", "device"):
            raise ValueError(f"pr_backend must be auto, host or device, got {pr_backend!r}")
        on_device = pr_backend == "device" or (pr_backend == "auto" and jax.default_backend() != "cpu")
        if on_device:
            out["precision"], out["recall"] = precision_recall_device(ref_feats, fake.pool, k=pr_k)
        else:
            out["precision"], out["recall"] = stats.precision_recall_blocked(ref_feats, fake.pool, k=pr_k, block=pr_block)
    return out


def evaluate_images(images: Any, reference, extractor: InceptionFeatureExtractor, *,
                    num_images: int | None = None, compute_pr: bool = True, is_splits: int = 10,
                    pr_k: int = 3, log: Callable[[str], None] | None = log_line,
                    every_secs: float = 30.0, pr_backend: str = "auto") -> dict[str, float]:
    """FID / IS / precision / recall of generated images against reference statistics
    (reference_stats.ReferenceStats). `images`: (N, H, W, 3) array or iterable of batches,
    uint8 or float in [0, 1]."""
    want_pr = compute_pr and getattr(reference, "features", None) is not None
    total = num_images if num_images is not None else (len(images) if hasattr(images, "shape") else None)
    # Few samples: keep them, FID then needs no D×D decomposition (frechet_distance_lowrank).
    keep = want_pr or (total is not None and total < len(reference.mu))
    acts = compute_activations(images, extractor, num_images=num_images, keep_pool=keep,
                               desc="samples", log=log, every_secs=every_secs)
    return compute_metrics(acts, reference, is_splits=is_splits, pr_k=pr_k, compute_pr=want_pr, pr_backend=pr_backend)
