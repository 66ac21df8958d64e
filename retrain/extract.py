"""Bottleneck extraction: image files -> backbone vectors, in batches.

Pixels come from ``decode.image_batches`` (reading, hashing, decoding and
resizing on tf.data's thread pool) while the main thread runs the backbone on
the previous batch, so the network is rarely left waiting. A file that
cannot be read or decoded becomes a failure with a reason; it never stops the
other images.
"""

import dataclasses
import weakref

import numpy as np

from retrain import decode
from retrain.quiet_tensorflow import import_tensorflow

_FORWARD = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class ExtractedBatch:
    """The outcome for one batch of input files.

    ``positions``: int [n], indices into the ``paths`` given to
    ``bottleneck_batches`` of the files that decoded; ``bottlenecks``: float32
    [n, feature_dim], one row per position; ``states``: FileState per
    position; ``failures``: (index into paths, reason, FileState or None when
    the failure is not the file's to remember: it could not even be read, or
    the process ran out of memory decoding it).
    """

    positions: np.ndarray
    bottlenecks: np.ndarray
    states: list
    failures: list

    def __len__(self):
        return len(self.positions) + len(self.failures)


def _forward_function(model, input_size):
    """The model's graph function, traced once per model (tracing takes seconds)."""
    if model not in _FORWARD:
        tf = import_tensorflow()
        _FORWARD[model] = tf.function(
            lambda pixels: model(pixels, training=False),
            input_signature=[tf.TensorSpec([None, input_size, input_size, 3], tf.float32)],
        )
    return _FORWARD[model]


def bottleneck_batches(paths, model, input_size, batch_size=32):
    """Yields an ExtractedBatch per ``batch_size`` files, in the order of ``paths``.

    Args:
      paths: list of image file paths.
      model: keras.Model, float32 [batch, input_size, input_size, 3] RGB in
        [0, 255] -> float32 [batch, feature_dim] (``backbones.load``).
      input_size: int, the model's square input side.
      batch_size: int, images per model call.

    Memory stays bounded by the batch size: nothing is kept between batches.
    """
    tf = import_tensorflow()
    outcomes = {}
    dataset = decode.image_batches(paths, input_size, batch_size, outcomes=outcomes,
                                  hash_files=True)
    forward = _forward_function(model, input_size)
    feature_dim = model.output_shape[-1]
    for indices, pixels, decoded in dataset:
        indices, decoded = indices.numpy(), decoded.numpy()
        # A short last batch is padded to batch_size: on CPU some batch sizes
        # (1 and 3 here) round differently in the last bits, and an image's
        # vector must not depend on how many images were extracted with it
        # (a sharded build must equal a single-process one bit for bit).
        if decoded.any():
            padding = [[0, batch_size - len(indices)], [0, 0], [0, 0], [0, 0]]
            vectors = forward(tf.pad(pixels, padding)).numpy()[: len(indices)][decoded]
        else:
            vectors = np.zeros((0, feature_dim), np.float32)
        results = [outcomes.pop(int(i)) for i in indices]
        yield ExtractedBatch(
            positions=indices[decoded],
            bottlenecks=vectors,
            states=[outcome.state for outcome, ok in zip(results, decoded) if ok],
            failures=[
                (int(i), outcome.reason, outcome.state if outcome.lasting else None)
                for i, outcome, ok in zip(indices, results, decoded)
                if not ok
            ],
        )
