"""Validation images with no near-copy in training: the ones model selection can trust.

Photos taken in bursts put near-copies of a validation image into training;
the head then scores such an image as it scores its training twin, and the
validation bucket flatters whatever fits training best (issue 23: a grocery
set measured 0.963 on validation and 0.694 on held-out photos). For each
validation image `distinct_validation` finds the cosine distance to its
nearest training vector, exactly (blocked matrix products of unit vectors),
and marks as "distinct" the images farther than the near-duplicate distance
of the data checks. Early stopping, the best fine-tuning epoch and the
"fine-tuning ended below the cached head" warning compare on those images
when there are enough of them (`DistinctValidation.used`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from retrain.evaluation.near_duplicates import DUPLICATE_DISTANCE

# Model selection uses the distinct images only when there are at least
# MIN_DISTINCT_IMAGES of them and they are at least MIN_DISTINCT_SHARE of the
# validation images. Below 50 images one image moves the accuracy by 2 points
# and the loss is noisier than the optimism it removes; below a fifth of the
# bucket the distinct images are the set's oddest photos (those unlike any
# training photo), too unlike the rest to stand for it. Otherwise the plain
# figures select, and the distinct ones are still shown.
MIN_DISTINCT_IMAGES = 50
MIN_DISTINCT_SHARE = 0.2
# Accuracy on all validation images this far above the accuracy on the
# distinct ones (3 points) is called optimistic in the log and on the page:
# beyond the noise of a few hundred images, and the gap issue 23 saw was 27.
OPTIMISTIC_GAP = 0.03
# Validation rows multiplied against one block of training rows at once:
# 4,096 x 4,096 float32 similarities are 64 MB, whatever the sets' sizes.
VALIDATION_CHUNK = 4096
# Training rows read from the cache per block (BottleneckCache.stream).
TRAINING_BLOCK = 4096


@dataclass(frozen=True)
class DistinctValidation:
    """Which validation images have no near-copy in training.

    distances: float32 [n_val], cosine distance (1 - cosine similarity, at
      least 0) from each validation vector to its nearest training vector,
      in the order of the validation vectors given.
    mask: bool [n_val], distances > threshold: the distinct images.
    threshold: the near-duplicate distance (DUPLICATE_DISTANCE).
    """

    distances: np.ndarray
    mask: np.ndarray
    threshold: float = DUPLICATE_DISTANCE

    @property
    def count(self) -> int:
        """Validation images."""
        return len(self.mask)

    @property
    def distinct(self) -> int:
        """Validation images farther than the threshold from every training image."""
        return int(self.mask.sum())

    @property
    def used(self) -> bool:
        """True when there are enough distinct images for model selection to use them only."""
        return (
            self.distinct >= MIN_DISTINCT_IMAGES
            and self.distinct >= MIN_DISTINCT_SHARE * self.count
        )

    def summary(self) -> str:
        """One line for the log: how many are distinct and what model selection uses."""
        head = (
            f"validation: {self.count} images, {self.distinct} farther than "
            f"{self.threshold:g} from every training image; "
        )
        if self.used:
            return head + "model selection uses those"
        return head + (
            f"model selection uses all of them (it needs at least {MIN_DISTINCT_IMAGES} "
            f"and {MIN_DISTINCT_SHARE:.0%} distinct)"
        )

    def record(self) -> dict:
        """JSON-ready for the run record: counts, threshold, used, distance quantiles, distances."""
        quantiles = (
            np.quantile(self.distances, [0.1, 0.5, 0.9]).round(4).tolist()
            if self.count
            else [None] * 3
        )
        return {
            "images": self.count,
            "distinct": self.distinct,
            "threshold": float(self.threshold),
            "used": self.used,
            "distance_quantiles": dict(zip(("p10", "median", "p90"), quantiles)),
            # Rounded to 0.0001 (a 50,000-image bucket writes about 400 KB).
            "distances": [round(float(d), 4) for d in self.distances],
        }


def optimism(plain_accuracy: float, distinct_accuracy: float) -> str:
    """A sentence when accuracy on all validation images flatters (OPTIMISTIC_GAP), else ""."""
    if plain_accuracy - distinct_accuracy <= OPTIMISTIC_GAP:
        return ""
    return (
        f"The split is optimistic: accuracy on all validation images is "
        f"{100 * (plain_accuracy - distinct_accuracy):.1f} points above that on the images "
        "with no near-copy in training; expect new photos nearer the lower figure."
    )


def nearest_training_distances(
    validation: np.ndarray,
    training_blocks: Iterable[np.ndarray],
    chunk: int = VALIDATION_CHUNK,
) -> np.ndarray:
    """Cosine distance from each validation vector to its nearest training vector, exactly.

    Args:
      validation: float [n_val, d] vectors (held in memory, as the head's
        validation sample is).
      training_blocks: float [k, d] blocks of training vectors, read once in
        any order (a cache stream: the training set need not fit in memory).
      chunk: validation rows per matrix product.

    Returns:
      float32 [n_val], 1 - the largest cosine similarity, at least 0; inf
      when there are no training vectors. A zero vector is at distance 1
      from everything.
    """
    unit = _unit(validation)
    best = np.full(len(unit), -np.inf, np.float32)
    for block in training_blocks:
        block = _unit(block)
        if not len(block):
            continue
        for start in range(0, len(unit), chunk):
            similarity = unit[start : start + chunk] @ block.T
            np.maximum(
                best[start : start + chunk], similarity.max(axis=1), out=best[start : start + chunk]
            )
    return np.maximum(1.0 - best, 0.0).astype(np.float32)


def distinct_validation(
    validation: np.ndarray,
    training_blocks: Iterable[np.ndarray],
    threshold: float = DUPLICATE_DISTANCE,
) -> DistinctValidation:
    """The DistinctValidation of float [n_val, d] validation vectors against training blocks."""
    distances = nearest_training_distances(validation, training_blocks)
    return DistinctValidation(distances, distances > threshold, threshold)


def from_cache(cache, training_entries, validation: np.ndarray) -> DistinctValidation:
    """`distinct_validation` against the cached vectors of `training_entries`, streamed.

    cache: a BottleneckCache holding every training entry; validation: float32
    [n_val, d] (the head's validation sample, or every validation vector).
    """
    return distinct_validation(validation, _vectors(cache.stream(training_entries, TRAINING_BLOCK)))


def for_entries(cache, training_entries, validation_entries) -> DistinctValidation:
    """The DistinctValidation of every validation entry, in entry order, both sides streamed.

    For a validation bucket too large to hold (the head scores a sample of
    it): validation vectors are read VALIDATION_CHUNK at a time, and the
    training vectors are streamed once per chunk.
    """
    distances = np.empty(len(validation_entries), np.float32)
    for positions, vectors in cache.stream(validation_entries, VALIDATION_CHUNK):
        distances[positions] = nearest_training_distances(
            vectors, _vectors(cache.stream(training_entries, TRAINING_BLOCK))
        )
    return DistinctValidation(distances, distances > DUPLICATE_DISTANCE)


def _vectors(blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterable[np.ndarray]:
    """The vectors of a `BottleneckCache.stream` (positions, vectors) iterator."""
    for _, vectors in blocks:
        yield vectors


def _unit(vectors) -> np.ndarray:
    """float32 rows scaled to length 1 (a zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))
