"""Prediction, the one place for every split and training path.

Class probabilities of a trained classifier: from cached bottlenecks for the
cached and distortion paths, from decoded images through the tuned backbone
after fine-tuning (whose backbone no longer matches the cached vectors). With
the test-time flip (`--test_time_flip`) each picture's mirror is a second
view, always decoded (the cache holds no mirrored vectors); the run combines
the views and calibrates them as the exported model does
(`retrain.evaluation.calibration`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrain.quiet_tensorflow import import_tensorflow
from retrain.training import datasets

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)

# File rows per block when predicting from the cache: at most 8,192 vectors
# (42 MB of Lite0 float32) in memory at once, whatever the set's size.
PREDICT_BLOCK_ROWS = 8192


def predict(head, bottlenecks: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities float32 [n, k] of the head for bottlenecks [n, d]; batch_size -1 = all."""
    if not len(bottlenecks):
        return np.zeros((0, head.output_shape[-1]), np.float32)
    batch = len(bottlenecks) if batch_size == -1 else batch_size
    # predict_on_batch, not predict: predict builds a tf.data pipeline with
    # the autotuner on, whose teardown can wait seconds (see retrain.data.pixel_batches).
    return np.concatenate(
        [
            head.predict_on_batch(bottlenecks[start : start + batch])
            for start in range(0, len(bottlenecks), batch)
        ]
    )


def predict_cached(
    head, cache, entries, batch_size: int, block_rows: int = PREDICT_BLOCK_ROWS
) -> np.ndarray:
    """`predict` on the cached bottlenecks of entries, read block by block; rows in entry order."""
    probabilities = np.zeros((len(entries), head.output_shape[-1]), np.float32)
    if entries:
        for positions, vectors in cache.stream(entries, block_rows=block_rows):
            probabilities[positions] = predict(head, vectors, batch_size)
    return probabilities


def predict_decoded(model, image_dir, entries, input_size: int, batch_size: int) -> np.ndarray:
    """float32 [views, len(entries), num_classes] probabilities of `model` on the decoded images.

    model: float32 [b, input_size, input_size, 3] RGB in [0, 255] -> one
    float32 [b, num_classes] output per view (see `pixel_classifier`). Images
    are decoded and resized as extraction does, batch_size at a time.
    """
    outputs = model.outputs if isinstance(model.outputs, list) else [model.outputs]
    probabilities = np.empty((len(outputs), len(entries), outputs[0].shape[-1]), np.float32)
    start = 0
    for pixels, _ in datasets.decoded_evaluation(Path(image_dir), entries, input_size, batch_size):
        predicted = model.predict_on_batch(pixels)
        views = predicted if isinstance(predicted, list) else [predicted]
        probabilities[:, start : start + len(pixels)] = np.stack(views)
        start += len(pixels)
    return probabilities


def pixel_classifier(head, backbone, input_size: int, views=("plain",)) -> keras.Model:
    """float32 [b, input_size, input_size, 3] -> one float32 [b, num_classes] output per view:
    backbone + head on the pixels ("plain") or on their mirror ("mirrored")."""
    from retrain.export import classifier  # deferred: only the decoded paths need it

    pixels = keras.Input((input_size, input_size, 3))
    outputs = [
        head(backbone(classifier.mirror(pixels) if view == "mirrored" else pixels))
        for view in views
    ]
    return keras.Model(pixels, outputs)


def split_probabilities(
    trained,
    cache,
    buckets,
    names,
    *,
    input_size: int,
    test_batch_size: int,
    extraction_batch_size: int,
    test_time_flip: bool = False,
    backbone=None,
) -> dict[str, np.ndarray]:
    """{split name: float32 [views, n, num_classes]} for each of `names`, as the path needs.

    trained: a classifier.TrainedClassifier; buckets: a data.buckets.Buckets.
    One view, the pictures; with test_time_flip a second, their mirrors
    (`retrain.evaluation.calibration.calibrate` combines them as the exported
    model does). Cached vectors unless the backbone was fine-tuned; then
    decoded images in batches of test_batch_size (extraction_batch_size when
    that is -1). The mirrors' vectors come from trained.backbone, or from
    `backbone` (the plain one the export uses) when that is None.
    """
    batch = extraction_batch_size if test_batch_size == -1 else test_batch_size
    flip = ("mirrored",) if test_time_flip else ()

    def decoded(model, name):
        return predict_decoded(model, buckets.image_dir, buckets[name].entries, input_size, batch)

    if trained.fine_tune_result is not None:
        # The tuned backbone no longer matches the cached vectors: decode the images.
        model = pixel_classifier(trained.head, trained.backbone, input_size, ("plain", *flip))
        return {name: decoded(model, name) for name in names}
    probabilities = {
        name: predict_cached(trained.head, cache, buckets[name].entries, test_batch_size)[None]
        for name in names
    }
    if test_time_flip:
        flip_backbone = trained.backbone if trained.backbone is not None else backbone
        model = pixel_classifier(trained.head, flip_backbone, input_size, flip)
        for name in names:
            probabilities[name] = np.concatenate([probabilities[name], decoded(model, name)])
    return probabilities
