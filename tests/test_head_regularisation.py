"""benchmarks/logreg_cv.py: the exact softmax fit and its penalty chosen by grouped cross-validation."""

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import logreg_cv as regularisation  # noqa: E402  (a benchmark's module, not retrain's)


def _digits():
    """scikit-learn's digits pixels, float32 [n, 64] scaled to [0, 1], split 2:1."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    return x[::3].copy(), y[::3].copy(), x[1::3], y[1::3]


def _fit(x, y, num_classes, c):
    basis = regularisation.Basis.of(x)
    fitted = regularisation.fit_softmax(
        basis.project(x), y, num_classes, regularisation.l2_of(c, len(x)), basis.spread
    )
    return basis.weights(*fitted)


def _objective(weights, x, y, c):
    logits = weights.logits(x).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    penalty = regularisation.l2_of(c, len(x)) * np.sum(weights.kernel.astype(np.float64) ** 2)
    return -np.mean(log_p[np.arange(len(y)), y]) + penalty


def test_exact_fit_reaches_logistic_regression_on_digits():
    train_x, train_y, test_x, test_y = _digits()
    weights = _fit(train_x, train_y, 10, 1.0)
    reference = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(train_x, train_y)
    mine = np.mean(weights.logits(test_x).argmax(axis=1) == test_y)
    assert abs(mine - reference.score(test_x, test_y)) <= 0.005
    theirs = regularisation.SoftmaxWeights(
        reference.coef_.T.astype(np.float32), reference.intercept_.astype(np.float32)
    )
    # The same objective's minimum: no higher than scikit-learn's, and the same weights.
    assert _objective(weights, train_x, train_y, 1.0) <= (
        _objective(theirs, train_x, train_y, 1.0) + 1e-5
    )
    assert np.abs(weights.kernel - theirs.kernel).max() < 0.05


def test_class_weights_tilt_the_fit_toward_a_class():
    train_x, train_y, test_x, test_y = _digits()
    basis = regularisation.Basis.of(train_x)
    z, l2 = basis.project(train_x), regularisation.l2_of(0.01, len(train_x))
    plain = basis.weights(*regularisation.fit_softmax(z, train_y, 10, l2, basis.spread))
    favour = np.where(train_y == 8, 20.0, 1.0)
    tilted = basis.weights(
        *regularisation.fit_softmax(z, train_y, 10, l2, basis.spread, sample_weight=favour)
    )
    assert np.sum(tilted.logits(test_x).argmax(1) == 8) > np.sum(
        plain.logits(test_x).argmax(1) == 8
    )


@pytest.mark.parametrize("noise, expected", [(False, 10.0), (True, 0.1)])
def test_cross_validation_picks_the_known_penalty(noise, expected):
    """Separable classes want the weakest penalty of the grid, random labels the strongest."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    centres = rng.normal(size=(3, 20)) * 4.0
    x = (centres[y] + rng.normal(size=(120, 20))).astype(np.float32)
    if noise:
        y = rng.permutation(y)
    basis = regularisation.Basis.of(x)
    choice = regularisation.choose_c(
        basis.project(x), y, 3, np.arange(len(y)), basis.spread, seed=0
    )
    assert choice.c == expected
    assert [c for c, _, _ in choice.scores] == list(regularisation.C_GRID)


def test_near_copies_and_nohash_names_share_a_group():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    x[5] = x[3] + 0.01 * rng.normal(size=64)  # a near-copy of image 3
    x[6] = x[5] + 0.01 * rng.normal(size=64)  # and of that copy: one chain
    paths = [f"class/{i}.jpg" for i in range(40)]
    paths[10], paths[20] = "class/burst_nohash_1.jpg", "class/burst_nohash_2.jpg"
    groups = regularisation.near_copy_groups(x, paths)
    assert groups[3] == groups[5] == groups[6]
    assert groups[10] == groups[20]
    assert len(np.unique(groups)) == 40 - 3


def test_folds_partition_the_rows_and_keep_each_group_whole():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(30), 4)
    y = rng.integers(0, 3, size=len(groups))
    folds = regularisation.grouped_folds(y, groups, folds=4, seed=0)
    assert len(folds) == 4
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(groups)))
    for held in folds:
        inside = set(groups[held].tolist())
        outside = set(np.delete(groups, held).tolist())
        assert not inside & outside


def test_the_keras_head_holds_the_chosen_fit():
    head_of_weights = regularisation.head_of_weights

    train_x, train_y, test_x, _ = _digits()
    paths = [f"{label}/{i}.png" for i, label in enumerate(train_y)]
    weights, choice = regularisation.fit_by_cross_validation(train_x, train_y, 10, paths)
    assert choice.c in regularisation.C_GRID
    head = head_of_weights(weights)
    logits = weights.logits(test_x)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(head(test_x)), expected, atol=1e-5)
