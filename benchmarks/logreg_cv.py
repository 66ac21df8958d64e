"""A softmax regression fit exactly, its L2 penalty chosen by grouped cross-validation.

A comparison for benchmarks/head_vs_logreg.py, not part of retrain: measured
against the cached head's early-stopped Adam fit (docs/benchmarks.md), it
matched it on Caltech-101, lost 3-4 points on flowers128 and took 10-200
times as long, so the head was left as it is.

The head is a softmax regression on cached bottlenecks. Here it is fit to the
minimum of its penalised loss (mean cross-entropy + l2 * ||kernel||^2, Keras's
`L2(l2)` convention) by full-batch L-BFGS, and `l2` is chosen from a small
grid by k-fold cross-validation on the training vectors. The folds keep groups
together: images whose file names differ only by a `_nohash_` suffix (the
hash split's own groups), and connected components of near-duplicate pairs
(cosine distance under `DUPLICATE_DISTANCE`), so that bursts of near-copies
cannot sit on both sides of a fold and make a weak penalty look good.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from retrain.data.images import split_percentage
from retrain.evaluation.near_duplicates import find_near_duplicates
from retrain.training.head import build_head

# The grid of LogisticRegression's C (l2 = 0.5 / (C * n)); C = 1 is scikit-learn's default.
C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
FOLDS = 4
# L-BFGS stops when the largest gradient entry is below GRADIENT_TOLERANCE or
# after MAX_ITERATIONS (digits' Lite0 vectors: 224 steps to 1e-5, 119 to 1e-4).
# Cross-validation only ranks the grid, so its fits stop after CV_ITERATIONS.
MAX_ITERATIONS = 300
CV_ITERATIONS = 100
GRADIENT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class SoftmaxWeights:
    """A softmax layer's weights: kernel float32 [d, k], bias float32 [k]."""

    kernel: np.ndarray
    bias: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 [n, k] logits of float32 [n, d] vectors."""
        return x @ self.kernel + self.bias


@dataclass(frozen=True)
class Choice:
    """The chosen penalty and the cross-validation figures behind it.

    c: the chosen C (l2 = 0.5 / (C * n) for n training vectors).
    scores: (C, mean held-out accuracy, mean held-out log loss), one per grid value.
    groups: how many groups the folds kept together (of n vectors).
    """

    c: float
    scores: tuple
    groups: int


def l2_of(c: float, n: int) -> float:
    """Keras's per-weight L2 coefficient for LogisticRegression's C on n examples."""
    return 0.5 / (c * n)


@dataclass(frozen=True)
class Basis:
    """Centred, rotated coordinates that make the penalised fit converge in few steps.

    mean: float32 [d] subtracted from each vector (only shifts the bias);
    rotation: float32 [d, d] orthogonal, the principal axes (it keeps ||kernel||);
    spread: float32 [d] the vectors' standard deviation along each axis.
    The minimum of the penalised loss is the same in these coordinates; only
    the optimiser's path is shorter (on digits' raw Lite0 vectors L-BFGS had
    not reached a gradient of 1e-4 after 300 steps; here it took 119).
    """

    mean: np.ndarray
    rotation: np.ndarray
    spread: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> Basis:
        """The basis of float32 [n, d] training vectors."""
        mean = x.mean(axis=0)
        variance, rotation = np.linalg.eigh(np.cov(x - mean, rowvar=False))
        spread = np.sqrt(np.maximum(variance, 0.0))
        return cls(mean.astype(np.float32), rotation.astype(np.float32), spread.astype(np.float32))

    def project(self, x: np.ndarray) -> np.ndarray:
        """float32 [n, d] coordinates of float32 [n, d] vectors."""
        return (x - self.mean) @ self.rotation

    def weights(self, kernel: np.ndarray, bias: np.ndarray) -> SoftmaxWeights:
        """The raw vectors' weights of a kernel [d, k] and bias [k] fit on projected ones."""
        raw_kernel = self.rotation @ kernel
        return SoftmaxWeights(raw_kernel, (bias - self.mean @ raw_kernel).astype(np.float32))


def fit_softmax(
    z: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    l2: float,
    spread: np.ndarray,
    start: tuple | None = None,
    sample_weight: np.ndarray | None = None,
    max_iterations: int = MAX_ITERATIONS,
) -> tuple[np.ndarray, np.ndarray]:
    """(kernel float32 [d, k], bias float32 [k]) minimising the penalised loss on projected vectors.

    The loss is mean(w_i * cross-entropy_i) + l2 * ||kernel||^2 (the bias is
    not penalised, as in LogisticRegression). z: float32 [n, d] coordinates
    (`Basis.project`); y: int [n] in [0, num_classes); spread: float32 [d]
    (`Basis.spread`), which scales each coordinate's step so that L-BFGS
    sees a well-conditioned problem; start: an earlier (kernel, bias) or None
    (zeros); sample_weight: float [n] (class weights by row), or None;
    max_iterations: L-BFGS's step budget.
    """
    n, d = z.shape
    # Kernel row j = scale_j * variable row j: each variable then moves the
    # penalised loss about as much as any other.
    scale = (1.0 / np.sqrt(spread**2 + 2 * l2)).astype(np.float32)[:, None]
    onehot = np.zeros((n, num_classes), np.float32)
    onehot[np.arange(n), y] = 1.0
    weight = (np.ones(n) if sample_weight is None else np.asarray(sample_weight)).astype(
        np.float32
    )[:, None] / np.float32(n)
    size = d * num_classes

    def loss_and_gradient(flat):
        kernel = scale * flat[:size].reshape(d, num_classes).astype(np.float32)
        logits = z @ kernel + flat[size:].astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -np.sum(weight * onehot * log_p, dtype=np.float64)
        loss += l2 * np.sum(kernel * kernel, dtype=np.float64)
        residual = weight * (np.exp(log_p) - onehot)
        grad_kernel = scale * (z.T @ residual + 2 * l2 * kernel)
        return loss, np.concatenate([grad_kernel.ravel(), residual.sum(axis=0)]).astype(np.float64)

    flat = np.zeros(size + num_classes)
    if start is not None:
        flat = np.concatenate([(start[0] / scale).ravel(), start[1]]).astype(np.float64)
    result = minimize(
        loss_and_gradient,
        flat,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iterations, "gtol": GRADIENT_TOLERANCE},
    )
    kernel = scale * result.x[:size].reshape(d, num_classes).astype(np.float32)
    return kernel, result.x[size:].astype(np.float32)


def near_copy_groups(x: np.ndarray, paths: list[str]) -> np.ndarray:
    """int [n] group ids: a `_nohash_` name group or a chain of near-duplicates shares one.

    x: float [n, d] bottlenecks; paths: their n relative paths.
    """
    # The hash split's own groups: images whose names differ only by a
    # `_nohash_` suffix share their split percentage (so do rare hash collisions,
    # whose merged group does no harm here).
    names = {}
    name_ids = np.array([names.setdefault(split_percentage(path), len(names)) for path in paths])
    pairs = find_near_duplicates(x, [str(i) for i in range(len(x))], [""] * len(x))
    first = np.array([int(pair.image_a) for pair in pairs] + list(range(len(x))), dtype=np.int64)
    second = np.array([int(pair.image_b) for pair in pairs] + list(range(len(x))), dtype=np.int64)
    # Rows are images, the extra columns name groups: linking an image to its
    # name group joins every image of that name in one component.
    count = len(x) + len(names)
    rows = np.concatenate([first, np.arange(len(x))])
    cols = np.concatenate([second, len(x) + name_ids])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    return labels[: len(x)]


def grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """`folds` held-out index arrays (int [m]) partitioning range(n); a group never straddles two.

    Stratified by class as far as the groups allow.
    """
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Classes with fewer groups than folds are fine here: they sit in fewer folds.
        warnings.simplefilter("ignore", UserWarning)
        return [held for _, held in splitter.split(np.zeros(len(y)), y, groups)]


def choose_c(
    z: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    groups: np.ndarray,
    spread: np.ndarray,
    grid=C_GRID,
    folds: int = FOLDS,
    seed: int = 0,
) -> Choice:
    """The C of `grid` with the best mean held-out accuracy over grouped folds.

    z: float32 [n, d] projected training vectors (`Basis.project`, one basis
    for every fold: it changes the optimiser's path, not the minimum);
    y: int [n]; groups: int [n] (`near_copy_groups`); spread: `Basis.spread`.
    Held-out log loss breaks ties of accuracy, then the smaller C (the
    stronger penalty). Each fold walks the grid from strong to weak penalty,
    starting each fit from the previous one.
    """
    held_out = grouped_folds(y, groups, folds, seed)
    totals = np.zeros((len(grid), 2))
    order = np.argsort(grid)
    for held in held_out:
        train = np.ones(len(y), bool)
        train[held] = False
        fitted = None
        for index in order:
            l2 = l2_of(grid[index], int(train.sum()))
            fitted = fit_softmax(
                z[train], y[train], num_classes, l2, spread, fitted, max_iterations=CV_ITERATIONS
            )
            totals[index] += _scores(SoftmaxWeights(*fitted), z[held], y[held])
    means = totals / len(held_out)
    best = min(order, key=lambda i: (-means[i, 0], means[i, 1], grid[i]))
    scores = tuple((grid[i], float(means[i, 0]), float(means[i, 1])) for i in range(len(grid)))
    return Choice(float(grid[best]), scores, int(len(np.unique(groups))))


def _scores(weights: SoftmaxWeights, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[accuracy, mean log loss] of the weights on (x, y)."""
    logits = weights.logits(x)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    return np.array([np.mean(logits.argmax(axis=1) == y), -np.mean(log_p[rows, y])])


def fit_by_cross_validation(
    x: np.ndarray, y: np.ndarray, num_classes: int, paths: list[str], seed: int = 0
) -> tuple[SoftmaxWeights, Choice]:
    """The exact fit of float32 [n, d] training vectors at the C that grouped CV chose.

    y: int [n]; paths: the n relative paths (their `_nohash_` groups).
    """
    x = np.asarray(x, dtype=np.float32)
    basis = Basis.of(x)
    z = basis.project(x)
    choice = choose_c(z, y, num_classes, near_copy_groups(x, paths), basis.spread, seed=seed)
    fitted = fit_softmax(z, y, num_classes, l2_of(choice.c, len(x)), basis.spread)
    return basis.weights(*fitted), choice


def head_of_weights(weights: SoftmaxWeights):
    """A retrain head (`build_head`) holding `weights` (kernel [d, k], bias [k])."""
    head = build_head(*weights.kernel.shape)
    head.layers[-1].set_weights([weights.kernel, weights.bias])
    return head
