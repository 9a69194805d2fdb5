"""Metrics of generated digits, on the digits evaluation classifier (our stand-in for
Inception; see `digits_classifier`).

For N generated images with requested labels:
- `accuracy`: fraction the classifier assigns to the requested label (IS-like: are the
  samples recognisable and on-class);
- `fd_digits`: Fréchet distance between Gaussian fits of the classifier's penultimate
  features of the samples and of the digits TEST split (FID-like);
- `precision` / `recall`: k-NN manifold precision/recall (k = 3) on the same features,
  samples vs the test split.
The floor is FD(train split, test split): what two independent draws of real digits
score. Like FID, FD has a small-sample bias, so compare rows computed with the same N.
"""

from __future__ import annotations

import numpy as np

from softdimo_jax.evaluation import stats
from softdimo_jax.evaluation.digits_classifier import predict

ROW_KEYS = ("fd_digits", "accuracy", "precision", "recall")


class DigitsEvaluator:
    """Holds the classifier and the test-split statistics; `evaluate(images, labels)` -> row."""

    def __init__(self, model, params, test_images, test_labels, train_images=None,
                 pr_k: int = 3, batch_size: int = 512):
        self.model = model
        self.params = params
        self.batch_size = batch_size
        self.pr_k = pr_k
        logits, self.test_features = self.features(test_images)
        self.test_accuracy = float(np.mean(np.argmax(logits, -1) == np.asarray(test_labels)))
        self.test_mu, self.test_sigma = stats.moments(self.test_features)
        self._train_images = train_images

    def features(self, images):
        images = np.asarray(images, np.float32)
        if not np.all(np.isfinite(images)):
            raise ValueError("generated images contain NaN/inf; the sampler or decoder is broken")
        return predict(self.model, self.params, np.clip(images, 0.0, 1.0), self.batch_size)

    def floor(self) -> dict:
        """FD(train split, test split): the best a generator can be expected to reach."""
        if self._train_images is None:
            raise ValueError("the floor needs the train images; pass train_images")
        _, feats = self.features(self._train_images)
        mu, sigma = stats.moments(feats)
        return {"fd_digits": stats.frechet_distance(mu, sigma, self.test_mu, self.test_sigma)}

    def evaluate(self, images, labels) -> dict:
        """Row {fd_digits, accuracy, precision, recall, reward} for generated `images`
        (N, S, S, C) in [0, 1] with requested `labels` (N,). `reward` is the mean
        log-probability of the requested class under the classifier (the built-in
        `digits_classifier_logprob` reward), so every row can be compared on it."""
        labels = np.asarray(labels)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        logits, feats = self.features(images)
        mu, sigma = stats.moments(feats)
        precision, recall = stats.precision_recall(self.test_features, feats, k=self.pr_k)
        return {
            "fd_digits": stats.frechet_distance(mu, sigma, self.test_mu, self.test_sigma),
            "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
            "precision": precision,
            "recall": recall,
            "reward": float(np.mean(_log_softmax(logits)[np.arange(len(labels)), labels])),
        }


def _log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def format_table(floor: dict | None, rows: dict[str, dict]) -> str:
    """Plain-text table of metrics rows (extra fields such as `reward` get columns too)."""
    keys = list(ROW_KEYS)
    for row in rows.values():
        keys += [k for k in row if k not in keys and isinstance(row[k], (int, float))]
    name_w = max([len("row")] + [len(r) for r in rows] + [len("floor (train vs test)")])
    head = f"{'row':<{name_w}}  " + "  ".join(f"{k:>10}" for k in keys)
    lines = [head, "-" * len(head)]
    if floor:
        lines.append(f"{'floor (train vs test)':<{name_w}}  {floor['fd_digits']:>10.3f}")
    for name, row in rows.items():
        cells = [f"{row[k]:>10.3f}" if isinstance(row.get(k), (int, float)) else f"{'-':>10}" for k in keys]
        lines.append(f"{name:<{name_w}}  " + "  ".join(cells))
    return "\n".join(lines)
