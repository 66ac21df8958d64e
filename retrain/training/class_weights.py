"""Class weights of the training loss: balanced weights, and Keras's {class: weight} form."""

from __future__ import annotations

import numpy as np

from retrain.errors import RetrainError


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Loss weights float64 [num_classes], inversely proportional to class frequency.

    weight_c = n / (num_classes * n_c), as scikit-learn's class_weight="balanced":
    every class then contributes the same total weight, and the mean weight
    per image is 1. A class absent from labels gets weight 0.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(
        np.float64
    )
    return np.divide(len(labels), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)


def class_weight_dict(class_weights, num_classes) -> dict[int, float]:
    """Keras's {class index: weight} of float [num_classes] weights; RetrainError if malformed."""
    weights = np.asarray(class_weights, dtype=np.float64)
    if weights.shape != (num_classes,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise RetrainError(
            f"class_weights must be {num_classes} finite weights >= 0, one per class. "
            f"Received: {class_weights!r}"
        )
    return {index: float(weight) for index, weight in enumerate(weights)}
