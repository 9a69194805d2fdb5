import numpy as np
import pytest

from softdimo_jax.evaluation import stats


def test_streaming_moments_equal_one_shot():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 7)) * 3 + 100
    sm = stats.StreamingMoments(7)
    for chunk in np.array_split(x, 9):
        sm.update(chunk)
    mu, cov = stats.moments(x)
    np.testing.assert_allclose(sm.mean, mu, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(sm.cov, cov, rtol=1e-10, atol=1e-10)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5))
    mu, cov = stats.moments(x)
    assert stats.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
    # Diagonal Gaussians: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a = np.array([1.0, 4.0, 9.0])
    b = np.array([4.0, 1.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    want = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = stats.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-10)
    # Agrees with the scipy.sqrtm formulation on full covariances
    y = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    mu2, cov2 = stats.moments(y)
    assert stats.frechet_distance(mu, cov, mu2, cov2) == pytest.approx(
        stats.frechet_distance_sqrtm(mu, cov, mu2, cov2), rel=1e-6
    )


def test_inception_score_limits():
    n, c = 1000, 10
    confident = np.full((n, c), -50.0)
    confident[np.arange(n), np.arange(n) % c] = 50.0
    assert stats.inception_score(confident)[0] == pytest.approx(c, rel=1e-6)
    assert stats.inception_score(np.zeros((n, c)))[0] == pytest.approx(1.0, abs=1e-9)


def test_precision_recall():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 4))
    assert stats.precision_recall(x, x, k=3) == (1.0, 1.0)
    p, r = stats.precision_recall(x, x + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    # Fake set covering only half the real modes: precision stays high, recall drops
    real = np.concatenate([rng.normal(size=(100, 2)), rng.normal(size=(100, 2)) + 20])
    fake = rng.normal(size=(200, 2))
    p, r = stats.precision_recall(real, fake, k=3)
    assert p > 0.9 and r < 0.6
