"""Distribution metrics on feature vectors, shared by FD-digits and Inception FID/IS/PR.

Everything here runs on the host in float64: the features come from a jitted extractor,
the statistics must not lose precision over 50k samples.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


class StreamingMoments:
    """Running mean and covariance of feature batches (float64), so samples never sit in
    memory at once. `update` takes (N, D) batches; `mean`/`cov` equal np.mean/np.cov
    (ddof=1) of the concatenation."""

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self._sum = np.zeros(dim, np.float64)
        self._outer = np.zeros((dim, dim), np.float64)
        self._shift: np.ndarray | None = None  # first batch mean: keeps sums well conditioned

    def update(self, feats) -> None:
        x = np.asarray(feats, np.float64).reshape(-1, self.dim)
        if not len(x):
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
        x = x - self._shift
        self.n += len(x)
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    @property
    def mean(self) -> np.ndarray:
        return self._shift + self._sum / self.n

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("covariance needs at least 2 samples")
        m = self._sum / self.n
        return (self._outer - self.n * np.outer(m, m)) / (self.n - 1)


def moments(feats) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(feats, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 − mu2||² + Tr(S1 + S2 − 2·sqrt(S1·S2)).

    sqrt(S1·S2) is taken as sqrt(sqrt(S1)·S2·sqrt(S1)), a symmetric PSD matrix whose
    eigendecomposition is stable for 2048×2048 covariances (unlike sqrtm of the
    non-symmetric product); trace(sqrt(S1 S2)) equals the sum of sqrt of its eigenvalues.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different dimension: {mu1.shape} vs {mu2.shape}")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w1, v1 = np.linalg.eigh(s1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ s2 @ root1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sum(np.sqrt(np.clip(w, 0, None)))
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    return float(max(fd, 0.0))


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The pytorch-fid formulation (scipy sqrtm of S1·S2), kept for cross-checks."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` chunks (the usual way)."""
    logits = np.asarray(logits, np.float64)
    logp = logits - _logsumexp(logits)
    p = np.exp(logp)
    scores = []
    for chunk_logp, chunk_p in zip(np.array_split(logp, splits), np.array_split(p, splits)):
        if not len(chunk_p):
            continue
        log_py = np.log(chunk_p.mean(axis=0) + 1e-300)
        kl = np.sum(chunk_p * (chunk_logp - log_py), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _logsumexp(x):
    m = x.max(axis=1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _pairwise_sq_dists(a, b, block: int = 4096):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    bb = np.sum(b * b, axis=1)
    out = np.empty((len(a), len(b)), np.float64)
    for i in range(0, len(a), block):
        x = a[i : i + block]
        out[i : i + block] = np.maximum(np.sum(x * x, axis=1)[:, None] - 2 * x @ b.T + bb[None], 0)
    return out


def _knn_radii(feats, k: int):
    d = _pairwise_sq_dists(feats, feats)
    # k-th nearest neighbour other than the point itself (column 0 after sorting is self).
    return np.sqrt(np.partition(d, k, axis=1)[:, k])


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    precision: fraction of fake samples inside the real manifold; recall: fraction of
    real samples inside the fake manifold.
    """
    real = np.asarray(real_feats, np.float64)
    fake = np.asarray(fake_feats, np.float64)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    r_real = _knn_radii(real, k)
    r_fake = _knn_radii(fake, k)
    d_fr = np.sqrt(_pairwise_sq_dists(fake, real))  # (F, R)
    precision = np.mean(np.any(d_fr <= r_real[None, :], axis=1))
    recall = np.mean(np.any(d_fr.T <= r_fake[None, :], axis=1))
    return float(precision), float(recall)


def knn_radii_blocked(feats, k: int, block: int = 1024) -> np.ndarray:
    """Same radii as the one-shot k-NN, holding only a (block, N) distance slab at a time."""
    feats = np.asarray(feats, np.float64)
    radii = np.empty(len(feats), np.float64)
    for i in range(0, len(feats), block):
        d = _pairwise_sq_dists(feats[i : i + block], feats, block=block)
        radii[i : i + block] = np.sqrt(np.partition(d, k, axis=1)[:, k])
    return radii


def _fraction_inside(queries, points, radii, block: int) -> float:
    inside = 0
    for i in range(0, len(queries), block):
        d = np.sqrt(_pairwise_sq_dists(queries[i : i + block], points, block=block))
        inside += int(np.sum(np.any(d <= radii[None, :], axis=1)))
    return inside / len(queries)


def precision_recall_blocked(real_feats, fake_feats, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """`precision_recall` for 50k×50k sets: memory O(block · N) instead of O(N²)
    (a 50k×50k float64 distance matrix would be 20 GB); same definitions and results."""
    real = np.asarray(real_feats, np.float64)
    fake = np.asarray(fake_feats, np.float64)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    r_real = knn_radii_blocked(real, k, block)
    r_fake = knn_radii_blocked(fake, k, block)
    precision = _fraction_inside(fake, real, r_real, block)
    recall = _fraction_inside(real, fake, r_fake, block)
    return float(precision), float(recall)
