"""The reference engine: the Keras backbone as one traced graph function of a fixed batch."""

import numpy as np

from retrain.quiet_tensorflow import import_tensorflow


class KerasEngine:
    """The Keras backbone as one traced graph function of a fixed batch.

    Calls of other sizes are cut into chunks of ``batch_size``, the last one
    zero-padded: on CPU some batch sizes (1 and 3 here) round differently in
    the last bits, and an image's vector must not depend on how many images
    were extracted with it (a sharded build equals a single-process one bit
    for bit). TensorFlow runs it on a GPU when it has one.
    """

    name = "keras"

    def __init__(self, model, input_size, batch_size=32):
        tf = import_tensorflow()
        self.model = model
        self.input_size = input_size
        self.batch_size = batch_size
        self.feature_dim = model.output_shape[-1]
        self._forward = tf.function(
            lambda pixels: model(pixels, training=False),
            input_signature=[tf.TensorSpec([batch_size, input_size, input_size, 3], tf.float32)],
        )

    def __call__(self, pixels):
        """float32 or uint8 [b, size, size, 3] in [0, 255] -> float32 np.ndarray [b, feature_dim]."""
        return in_fixed_batches(self._forward, pixels, self.batch_size, self.feature_dim)


def in_fixed_batches(forward, pixels, batch_size, feature_dim):
    """Runs ``forward`` (a fixed-batch function) over any number of images.

    pixels: float32 or uint8 [b, size, size, 3] in [0, 255]; returns float32
    np.ndarray [b, feature_dim]. uint8 pixels become float32 a chunk at a
    time, while the chunk is in the CPU's cache.
    """
    pixels = np.asarray(pixels)  # a CPU tf.Tensor's own buffer, not a copy
    count = len(pixels)
    vectors = np.empty((count, feature_dim), np.float32)
    for start in range(0, count, batch_size):
        chunk = np.asarray(pixels[start : start + batch_size], np.float32)
        if len(chunk) < batch_size:
            padding = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], np.float32)
            chunk = np.concatenate([chunk, padding])
        vectors[start : start + batch_size] = np.asarray(forward(chunk))[: count - start]
    return vectors
