"""The bottleneck vectors the exported model sees, for any images of the run.

The unknown score (`retrain.evaluation.unknown`) compares a picture's vector
with training vectors in the exported model's own bottleneck space: the
cached vectors unless the backbone was fine-tuned, whose tuned weights no
longer match the cache; then the images are decoded (as extraction decodes
them) and go through the tuned backbone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrain.training import datasets


def bottleneck_vectors(trained, cache, image_dir, entries, input_size: int, batch_size: int):
    """float32 [len(entries), feature_dim], rows in entry order.

    trained: a classifier.TrainedClassifier; cache: the run's BottleneckCache;
    batch_size: images per forward pass of the tuned backbone.
    """
    if trained.fine_tune_result is None:
        return cache.read(list(entries))
    dim = int(trained.backbone.output_shape[-1])
    vectors = np.empty((len(entries), dim), np.float32)
    start = 0
    for pixels, _ in datasets.decoded_evaluation(Path(image_dir), entries, input_size, batch_size):
        vectors[start : start + len(pixels)] = trained.backbone.predict_on_batch(pixels)
        start += len(pixels)
    return vectors
