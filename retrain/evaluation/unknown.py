"""The unknown detector: how far a picture's bottleneck vector is from the training vectors.

The score of a vector is its cosine distance to the K-th nearest vector of a
reference sample of training vectors (1 - the K-th largest cosine
similarity), in the exported model's own bottleneck space. A picture of none
of the classes lies far from all of them; a picture of a trained class has
at least K close training pictures. The threshold is the split-conformal
`acceptance` quantile of the validation images' scores: at least that share
of new in-distribution pictures score at or below it; a score above it
means "unknown".
docs/unknown.md gives the measurements behind K, the reference cap and the
choice of this score over the Mahalanobis distance to the class means.
No TensorFlow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from retrain.data import sampling

logger = logging.getLogger(__name__)

# The score's name in the sidecar file, TFLite metadata, metrics.json and the record.
METHOD = "cosine_kth_nearest"
# Neighbours counted: the K-th nearest reference vector decides the score.
K = 5
# At most this many training vectors are kept as the reference (spread over
# the classes): scoring costs one [m, n] matrix product, the sidecar file
# keeps n rows of float16.
MAX_REFERENCE = 4096
# Query rows scored at once: the similarity block is at most
# QUERY_BLOCK x MAX_REFERENCE float32 (16 MB), whatever the number of queries.
QUERY_BLOCK = 1024


def unit_rows(vectors) -> np.ndarray:
    """float32 [n, d]: the rows of `vectors` ([n, d], any real dtype) at unit L2 length.

    A zero row stays zero (its cosine similarity to everything is 0, so its
    score is 1: far, and finite)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [n, d], not of shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def kth_similarity(queries, reference, k: int, block: int = QUERY_BLOCK) -> np.ndarray:
    """float32 [m]: each unit query row's k-th largest cosine similarity to the reference rows.

    queries: float32 [m, d] and reference: float32 [n, d], rows of unit
    length; 1 <= k <= n. Computed `block` query rows at a time, so memory
    stays at block x n floats."""
    result = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), block):
        similarity = queries[start : start + block] @ reference.T
        # The k-th largest of n is the (n - k)-th smallest.
        result[start : start + block] = np.partition(similarity, -k, axis=1)[:, -k]
    return result


@dataclass(frozen=True)
class UnknownDetector:
    """A fitted detector: reference vectors, neighbour count and threshold.

    reference: float32 [n, d], rows of unit L2 length (training vectors).
    k: the neighbour whose distance is the score, 1 <= k <= n.
    threshold: scores above it are unknown.
    acceptance: the share of validation images the threshold accepts, (0, 1].
    """

    reference: np.ndarray
    k: int
    threshold: float
    acceptance: float

    def scores(self, vectors, block: int = QUERY_BLOCK) -> np.ndarray:
        """float32 [m] in [0, 2]: 1 - the k-th largest cosine similarity of each row of
        `vectors` (float [m, d], the model's bottleneck vectors) to the reference."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.reference.shape[1]:
            raise ValueError(
                f"vectors must be [m, {self.reference.shape[1]}], not of shape {vectors.shape}"
            )
        return 1.0 - kth_similarity(unit_rows(vectors), self.reference, self.k, block)

    def is_unknown(self, scores) -> np.ndarray:
        """bool [m]: True where a score (from `scores`) is past the threshold."""
        return np.asarray(scores) > self.threshold


def acceptance_threshold(scores, acceptance: float) -> float:
    """The split-conformal threshold: the ceil(acceptance * (m + 1))-th smallest of `scores`.

    scores: float [m], m >= 1, of in-distribution pictures the detector did
    not see (the validation images). For a new picture exchangeable with
    them, P(its score <= threshold) >= acceptance, whatever m: the plain
    empirical quantile (the ceil(acceptance * m)-th) falls short on small
    validation sets (measured on 20 Caltech-101 draws with 11-95 validation
    images: 6.0% of held-out in-class photos called unknown on average, over
    8% in 7 draws; this rank: 3.7%, over 8% in 2). When the rank passes m
    (fewer than acceptance / (1 - acceptance) scores) it is the maximum.
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    # A small tolerance: 0.95 * 20 is 19.000000000000004.
    rank = int(np.ceil(acceptance * (len(ordered) + 1) - 1e-9))
    return float(ordered[min(max(rank, 1), len(ordered)) - 1])


def fit(reference, validation, acceptance: float, k: int = K) -> UnknownDetector:
    """The detector of `reference` with the threshold accepting `acceptance` of `validation`.

    reference: float [n, d], n >= 1, training vectors (already sampled, see
    `reference_entries`). validation: float [m, d] in-distribution vectors
    not in the reference, or None / empty: then each reference vector is
    scored against the others (its (k+1)-th neighbour counting itself), which
    makes a tighter threshold, and a warning says so. acceptance: (0, 1].
    """
    reference = unit_rows(reference)
    if len(reference) == 0:
        raise ValueError("the unknown detector needs at least one reference vector")
    if not 0 < acceptance <= 1:
        raise ValueError(f"acceptance must be in (0, 1], not {acceptance!r}")
    k = min(k, len(reference))
    if validation is not None and len(validation):
        detector = UnknownDetector(reference, k, 0.0, float(acceptance))
        scores = detector.scores(validation)
    else:
        logger.warning(
            "No validation images for the unknown threshold: it is set on the training "
            "vectors' distances to each other, which are smaller than a new picture's, so "
            "more than %.0f%% of the pictures of the classes may be called unknown; add "
            "validation images (--validation_percentage) for a reliable threshold.",
            100 * (1 - acceptance),
        )
        # Counting itself (similarity 1), the vector's k-th neighbour among
        # the others is its (k+1)-th overall.
        neighbour = min(k + 1, len(reference))
        scores = 1.0 - kth_similarity(reference, reference, neighbour)
    return UnknownDetector(reference, k, acceptance_threshold(scores, acceptance), acceptance)


def reference_entries(training_entries, count: int = MAX_REFERENCE) -> list:
    """Up to `count` training ImageEntry objects, spread over the classes (see
    sampling.spread_over_classes): the rows the detector keeps."""
    return sampling.spread_over_classes(training_entries, count)
