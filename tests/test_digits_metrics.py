"""Digits data and the evaluation network: fixed split, FD ≈ 0 for the test split against
itself, high accuracy on real test digits, the floor, and FD growing with corruption."""

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from softdimo_jax.runtime import mesh as meshlib
from softdimo_jax.data import digits
from softdimo_jax.evaluation.digits_classifier import train_classifier
from softdimo_jax.evaluation.digits_metrics import DigitsEvaluator, format_table


def test_split_is_fixed_and_disjoint():
    tr_x, tr_y = digits.load_digits_split("train")
    te_x, te_y = digits.load_digits_split("test")
    assert tr_x.shape == (1437, 16, 16, 1) and te_x.shape == (360, 16, 16, 1)
    assert tr_x.min() >= 0 and tr_x.max() <= 1
    assert np.bincount(te_y).min() >= 34  # stratified
    train_idx, test_idx = digits._split_indices()
    assert not set(train_idx) & set(test_idx)
    x3, _ = digits.load_digits_split("test", image_size=32, channels=3)
    assert x3.shape == (360, 32, 32, 3)
    with pytest.raises(ValueError, match="unknown digits split"):
        digits.load_digits_split("validation")


def test_batches_are_a_function_of_the_step():
    a = digits.batch_indices(100, 32, 7, seed=1)
    np.testing.assert_array_equal(a, digits.batch_indices(100, 32, 7, seed=1))
    epoch = np.concatenate([digits.batch_indices(96, 32, s, seed=1) for s in range(3)])
    assert sorted(epoch) == list(range(96))  # one epoch = a permutation


@pytest.fixture(scope="module")
def evaluator():
    cfg = ConfigDict(dict(num_classes=10, width=16, feature_dim=32, image_size=16, num_steps=150,
                          batch_size=64, learning_rate=3e-3, warmup_steps=10, weight_decay=1e-4,
                          max_shift=1, log_every=150))
    tr_x, tr_y = digits.load_digits_split("train")
    te_x, te_y = digits.load_digits_split("test")
    model, params, _ = train_classifier(cfg, tr_x, tr_y, None, mesh=meshlib.make_mesh(1))
    return DigitsEvaluator(model, params, te_x, te_y, train_images=tr_x)


def test_real_test_images_against_themselves(evaluator):
    te_x, te_y = digits.load_digits_split("test")
    row = evaluator.evaluate(te_x, te_y)
    assert row["fd_digits"] < 1e-6
    assert row["accuracy"] > 0.85 and evaluator.test_accuracy == row["accuracy"]
    assert row["precision"] == 1.0 and row["recall"] == 1.0
    floor = evaluator.floor()["fd_digits"]
    assert floor > 0


def test_fd_grows_with_corruption_and_wrong_labels_lower_accuracy(evaluator):
    te_x, te_y = digits.load_digits_split("test")
    rng = np.random.default_rng(0)
    noisy = np.clip(te_x + 0.5 * rng.normal(size=te_x.shape), 0, 1).astype(np.float32)
    row_noisy = evaluator.evaluate(noisy, te_y)
    assert row_noisy["fd_digits"] > 5 * evaluator.floor()["fd_digits"]
    row_wrong = evaluator.evaluate(te_x, (te_y + 1) % 10)
    assert row_wrong["accuracy"] < 0.1
    table = format_table({"fd_digits": 1.0}, {"noisy": row_noisy})
    assert "noisy" in table and "fd_digits" in table
    with pytest.raises(ValueError, match="NaN"):
        evaluator.evaluate(np.full_like(te_x[:10], np.nan), te_y[:10])
