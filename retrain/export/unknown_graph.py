"""The unknown score inside the SavedModel and TFLite graphs.

`scored_classifier(classifier, detector)` is the fixed-size classifier
(`retrain.export.classifier.fixed_size_classifier`) with a second output, the
unknown score float32 [batch]: the picture's bottleneck vector scored by
`NearestDistance`, which repeats `retrain.evaluation.unknown.UnknownDetector.scores`
in graph ops (rows to unit length, one matrix product with the reference
rows, the k-th largest similarity, 1 minus it). The SavedModel calls this
model in its signatures and the TFLite converter converts it; it is never
saved as a `.keras` file (NearestDistance is not a layer the `.keras` loader
allows: the `.keras` model keeps one output and its detector in a sidecar
file, `retrain.export.unknown_file`).
"""

from __future__ import annotations

import numpy as np

from retrain.export import classifier as classifier_module
from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)

# The name of the score output (a SavedModel signature key, a TFLite output tensor).
SCORE = "unknown_score"
# The TFLite ops of the score (and of the head, whose FULLY_CONNECTED op it shares; the
# backbone has none) that the int8 export keeps float32: quantized, the similarities
# and the score would be clipped to the ranges of the calibration images, which are
# all of known classes, so every unknown picture would get the same capped score.
FLOAT_OPS = (
    "FULLY_CONNECTED",
    "SQUARE",
    "SUM",
    "SQRT",
    "MAXIMUM",
    "DIV",
    "TOPK_V2",
    "STRIDED_SLICE",
    "SUB",
)


class NearestDistance(keras.layers.Layer):
    """float32 [batch, d] vectors -> float32 [batch]: 1 - the k-th largest cosine similarity
    of each vector to the reference rows (float32 [n, d], unit length; k <= n).

    The reference is a frozen weight, stored transposed [d, n] so the product
    is a plain matrix multiplication (a FullyConnected op in TFLite). The
    division by max(norm, float32 tiny) is UnknownDetector's `unit_rows`.
    """

    def __init__(self, reference: np.ndarray, k: int, **kwargs):
        super().__init__(trainable=False, **kwargs)
        reference = np.asarray(reference, np.float32)
        self.k = int(k)
        self.reference_t = self.add_weight(
            shape=(reference.shape[1], reference.shape[0]),
            initializer="zeros",
            trainable=False,
            name="reference_t",
        )
        self.reference_t.assign(reference.T)

    def call(self, vectors):
        ops = keras.ops
        norms = ops.sqrt(ops.sum(ops.square(vectors), axis=-1, keepdims=True))
        unit = vectors / ops.maximum(norms, np.finfo(np.float32).tiny)
        similarity = ops.matmul(unit, self.reference_t)
        nearest, _ = ops.top_k(similarity, k=self.k)
        return 1.0 - nearest[:, self.k - 1]

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)


def scored_classifier(classifier: keras.Model, detector) -> keras.Model:
    """The fixed-size model with two outputs: probabilities and the unknown score.

    classifier: a `build_classifier` model that names its bottleneck
    (`classifier.has_vectors`). detector: an UnknownDetector fitted in that
    model's bottleneck space (reference float32 [n, d], k).

    Returns keras.Model: float32 [batch, size, size, 3] RGB in [0, 255],
    already resized -> [float32 [batch, classes] probabilities, float32
    [batch] scores] (the second named SCORE).
    """
    fixed = classifier_module.fixed_size_classifier(classifier, with_vectors=True)
    probabilities, vectors = fixed.outputs
    score = NearestDistance(stored_reference(detector), detector.k, name=SCORE)(vectors)
    return keras.Model(fixed.inputs, [probabilities, score], name="retrained_classifier_scored")


def stored_reference(detector) -> np.ndarray:
    """float32 [n, d]: the detector's reference as the `.keras` sidecar gives it back
    (`unknown_file` stores float16, read as unit float32 rows), so every format scores
    against the same rows."""
    from retrain.evaluation import unknown

    return unknown.unit_rows(np.asarray(detector.reference, np.float16).astype(np.float32))


def deployable(classifier: keras.Model, detector=None) -> keras.Model:
    """What the SavedModel and TFLite exports convert: `scored_classifier` when there is a
    detector and the classifier names its bottleneck, else the one-output fixed-size model."""
    if detector is not None and classifier_module.has_vectors(classifier):
        return scored_classifier(classifier, detector)
    return classifier_module.fixed_size_classifier(classifier)


def is_scored(model: keras.Model) -> bool:
    """Whether a model from `deployable` has the score output."""
    return len(model.outputs) == 2
