"""In-training FID: a hook that samples the generator every N steps and scores the samples
against reference statistics (softdimo_jax.evaluation.reference_stats)."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from softdimo_jax.evaluation.fid import InceptionFeatureExtractor, evaluate_images
from softdimo_jax.evaluation.reference_stats import ReferenceStats, load_reference
from softdimo_jax.runtime.artifacts import log as log_line


class PeriodicFID:
    """In-training FID hook: every `every_steps` steps, draws `num_samples` images from
    `sample_fn` and computes FID (and IS) against the reference statistics.

        fid_hook = PeriodicFID(5000, lambda n, step: sample(state, n), "ref.npz", inception_params)
        for step in range(1, num_steps + 1):
            ...
            metrics = fid_hook(step)   # {} unless it ran this step
        metrics = fid_hook.compute(step)   # run now, whatever the step

    It follows clu's `periodic_actions.PeriodicAction` protocol (every_steps / every_secs /
    on_steps, the first call never triggers, `hook(step)` after each step), so it can sit in
    the same hook list as clu's ReportProgress; it does not subclass it because importing
    clu.periodic_actions pulls in TensorFlow (seconds) for every user of this module.
    Calling it returns the metrics dict when it ran (truthy) and {} otherwise.

    `extractor` reuses an existing InceptionFeatureExtractor (then inception_params may be None).
    `sample_fn(num_samples, step)` returns an (N, H, W, 3) array or an iterable of batches
    (uint8, or float in [0, 1]). Results go to `writer.write_scalars(step, metrics)` when a
    clu metric writer is given, and are kept in `self.last_metrics`.
    """

    def __init__(self, every_steps: int, sample_fn: Callable[[int, int], Any], reference_path: str | Any,
                 inception_params: Any, num_samples: int = 5000, *, mesh=None, batch_size: int | None = None,
                 writer: Any = None, prefix: str | None = None, on_steps: Iterable[int] = (),
                 every_secs: float | None = None, log: Callable[[str], None] | None = log_line,
                 compute_pr: bool = False, extractor: InceptionFeatureExtractor | None = None):
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be >= 1 (or None), got {every_steps}")
        self.every_steps, self.every_secs, self.on_steps = every_steps, every_secs, set(on_steps)
        self._previous_step: int | None = None
        self._previous_time: float | None = None
        self.sample_fn = sample_fn
        self.num_samples = int(num_samples)
        if extractor is None and inception_params is None:
            raise ValueError("PeriodicFID needs inception_params (or a ready extractor=...)")
        self.extractor = extractor or InceptionFeatureExtractor(inception_params, mesh=mesh, batch_size=batch_size)
        self.reference = (reference_path if isinstance(reference_path, ReferenceStats)
                          else load_reference(reference_path, need_features=compute_pr, extractor=self.extractor))
        self.writer = writer
        if prefix is None:  # e.g. "eval/fid5k"
            prefix = f"eval/fid{self.num_samples // 1000}k" if self.num_samples % 1000 == 0 else "eval/fid"
        self.prefix = prefix
        self.log = log
        self.compute_pr = compute_pr
        self.last_metrics: dict[str, float] | None = None

    def compute(self, step: int) -> dict[str, float]:
        t0 = time.monotonic()
        images = self.sample_fn(self.num_samples, step)
        m = evaluate_images(images, self.reference, self.extractor, num_images=self.num_samples,
                            compute_pr=self.compute_pr, log=self.log, every_secs=60.0)
        metrics = {self.prefix if k == "fid" else f"{self.prefix}_{k}": v for k, v in m.items() if k != "num_samples"}
        metrics[f"{self.prefix}_secs"] = time.monotonic() - t0
        self.last_metrics = metrics
        if self.writer is not None:
            self.writer.write_scalars(step, metrics)
        if self.log is not None:
            self.log(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    def _should_trigger(self, step: int, t: float) -> bool:
        if step == self._previous_step:
            return False
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        if self.every_secs is not None and t - self._previous_time > self.every_secs:
            return True
        return step in self.on_steps

    def __call__(self, step: int, t: float | None = None) -> dict[str, float]:
        t = time.monotonic() if t is None else t
        if self._previous_step is None:  # like clu: the first call only starts the clock
            self._previous_step, self._previous_time = step, t
            return {}
        if not self._should_trigger(step, t):
            return {}
        metrics = self.compute(step)
        self._previous_step, self._previous_time = step, time.monotonic()
        return metrics
