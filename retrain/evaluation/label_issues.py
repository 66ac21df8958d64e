"""Suspicious labels: images whose given label their cached bottleneck vectors disagree with.

A logistic regression is cross-validated on the vectors (scikit-learn's
`cross_val_predict`), so every image gets class probabilities from a model
that never saw it. The images whose given label those probabilities disagree
with (another class is more likely, or cleanlab's `find_label_issues` flags
them) are listed, ranked by cleanlab's label quality score (lowest = most
suspicious). Only vectors the run already has in memory are used: seconds,
not a pass over the images.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cleanlab.filter
import cleanlab.rank
import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from retrain.data.sampling import sample_rows
from retrain.errors import RetrainError
from retrain.evaluation.check_limits import PCA_SAMPLE, THREADS

# Cross-validation folds for the out-of-sample probabilities (fewer when the
# smallest class has fewer images).
LABEL_ISSUE_FOLDS = 5
# The regression sees the vectors projected on this many principal components.
# On Lite0 vectors with 12 planted errors it ranked them as high as the full
# 1280 dimensions did (Caltech-101, 17 classes: 12 of 12 in the top 36 either
# way; flowers128: 5 with both), at a fraction of the cost.
LABEL_ISSUE_COMPONENTS = 64
# Each fold's regression is fit on at most this many images (every class keeps
# an equal share); the held-out images of the fold are all scored. This caps
# the cost of large sets: fitting dominates, scoring is one matrix product.
LABEL_ISSUE_FIT_ROWS = 20_000


@dataclass(frozen=True)
class LabelIssue:
    """An image whose given label the cross-validated model disagrees with.

    score: cleanlab's label quality in [0, 1] (self-confidence: the
    out-of-sample probability of the given label); lower is more suspicious.
    """

    image: str
    given: str
    suggested: str
    score: float


def out_of_sample_probabilities(
    bottlenecks: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0
) -> np.ndarray:
    """Class probabilities float32 [n, num_classes] from models that never saw the row's image.

    bottlenecks: float [n, d]; labels: int [n] in [0, num_classes). The
    vectors are standardized and projected on LABEL_ISSUE_COMPONENTS principal
    components (fit without labels, on all rows); a LogisticRegression is
    cross-validated on them with stratified folds (at most LABEL_ISSUE_FOLDS,
    at least 2), each fit on at most LABEL_ISSUE_FIT_ROWS images.
    """
    x, labels = _check(bottlenecks, labels, num_classes)
    with threadpool_limits(THREADS):
        return _cross_validated(x, labels, num_classes, seed)


def _cross_validated(x, labels, num_classes, seed):
    counts = np.bincount(labels, minlength=num_classes)
    folds = int(np.clip(counts[counts > 0].min(), 2, LABEL_ISSUE_FOLDS))
    # The projection is fit once on every image's vector: it never sees a
    # label, so no fold learns anything of its held-out labels from it, and
    # it costs one PCA instead of one a fold.
    scaled = StandardScaler().fit_transform(x)
    components = min(LABEL_ISSUE_COMPONENTS, x.shape[1], len(x) - 1)
    if components < x.shape[1]:
        pca = PCA(components, random_state=seed).fit(scaled[sample_rows(len(x), PCA_SAMPLE)])
        scaled = pca.transform(scaled)
    model = LogisticRegression(C=0.1, max_iter=100)
    with warnings.catch_warnings():
        # A class smaller than the fold count, or absent from one fold's
        # training part, is expected in small data; cross_val_predict then
        # gives that class probability 0 in the fold, which is right.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        probabilities = cross_val_predict(
            model,
            scaled,
            labels,
            method="predict_proba",
            cv=list(_capped_folds(labels, folds, LABEL_ISSUE_FIT_ROWS, seed)),
        )
    full = np.zeros((len(x), num_classes), np.float32)
    full[:, np.unique(labels)] = probabilities
    return full


def _capped_folds(labels: np.ndarray, folds: int, fit_rows: int, seed: int):
    """Stratified (training rows, held-out rows) splits; training rows capped at fit_rows.

    Held-out rows partition all rows, as cross_val_predict needs. Above the
    cap, each class keeps at most an equal share of its training rows.
    """
    rng = np.random.default_rng(seed)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for train, held_out in splitter.split(np.zeros((len(labels), 1)), labels):
        if len(train) > fit_rows:
            classes = np.unique(labels[train])
            share = max(1, fit_rows // len(classes))
            train = np.sort(
                np.concatenate(
                    [rng.permutation(train[labels[train] == c])[:share] for c in classes]
                )
            )
        yield train, held_out


def find_label_issues(
    bottlenecks: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    images: list[str],
    seed: int = 0,
) -> list[LabelIssue]:
    """Images whose label the cached vectors disagree with, most suspicious first.

    bottlenecks: float [n, d]; labels: int [n] class indices; images: n
    relative paths. Needs at least two images; fewer give an empty list.
    """
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise RetrainError(
            f"One image path per label is needed. Received: {len(images)} paths, "
            f"{len(labels)} labels"
        )
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        return []
    probabilities = out_of_sample_probabilities(bottlenecks, labels, len(class_names), seed)
    present = np.unique(labels)
    # cleanlab wants every class of the columns to occur in labels.
    local = np.searchsorted(present, labels)
    local_probabilities = probabilities[:, present]
    local_probabilities /= np.maximum(local_probabilities.sum(axis=1, keepdims=True), 1e-12)
    quality = cleanlab.rank.get_label_quality_scores(
        local, local_probabilities, method="self_confidence"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = cleanlab.filter.find_label_issues(local, local_probabilities, n_jobs=1)
    suggested = present[local_probabilities.argmax(axis=1)]
    rows = np.flatnonzero(flagged | (suggested != labels))
    rows = rows[np.argsort(quality[rows], kind="stable")]
    return [
        LabelIssue(
            images[row],
            class_names[labels[row]],
            class_names[suggested[row]],
            round(float(quality[row]), 6),
        )
        for row in rows
    ]


def _check(bottlenecks, labels, num_classes):
    x = np.asarray(bottlenecks, dtype=np.float32)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != x.shape[:1]:
        raise RetrainError(
            f"bottlenecks must be [n, d] and labels [n]. "
            f"Received: bottlenecks.shape={x.shape}, labels.shape={labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise RetrainError(
            f"labels must be class indices in [0, {num_classes}). "
            f"Received: range=[{labels.min()}, {labels.max()}]"
        )
    return x, labels.astype(np.int64)
