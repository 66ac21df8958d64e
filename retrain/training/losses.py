"""Cross-entropy on class indices with label smoothing, which Keras offers for one-hot labels only.

Smoothing by e trains toward (1 - e) on the true class and e / k spread over
all k classes: the loss is (1 - e) * -log p[y] + e * mean_k(-log p[k]). It
keeps the confident top probability of fine-tuned networks in check
(Szegedy et al. 2016; Mueller et al. 2019) without one-hot labels, so class
weights and the validation scores keep working on indices.
"""

from __future__ import annotations

from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)
from keras import ops  # noqa: E402

# Probabilities are clipped here before the log, as Keras's own cross-entropy does.
_EPSILON = 1e-7


class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Loss of float32 [b, k] probabilities against int [b] class indices, smoothed by `smoothing`."""

    def __init__(self, smoothing: float, name: str = "smoothed_sparse_crossentropy"):
        super().__init__(name=name)
        self.smoothing = float(smoothing)

    def call(self, y_true, y_pred):
        log_p = ops.log(ops.clip(y_pred, _EPSILON, 1.0))
        labels = ops.cast(ops.reshape(y_true, (-1, 1)), "int32")
        true_class = -ops.take_along_axis(log_p, labels, axis=-1)[:, 0]
        spread = -ops.mean(log_p, axis=-1)
        return (1.0 - self.smoothing) * true_class + self.smoothing * spread

    def get_config(self):
        return {"smoothing": self.smoothing, "name": self.name}


def fine_tune_loss(smoothing: float):
    """The loss fine-tuning compiles with: Keras's own when there is no smoothing."""
    if not smoothing:
        return keras.losses.SparseCategoricalCrossentropy()
    return SmoothedSparseCrossentropy(smoothing)
