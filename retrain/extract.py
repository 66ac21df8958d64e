"""Bottleneck extraction: image files -> backbone vectors, in batches.

Reading, hashing, decoding and resizing run on tf.data's thread pool
(Pillow and TensorFlow release the GIL) while the main thread runs the
backbone on the previous batch, so the network is rarely left waiting. A
file that cannot be read or decoded becomes a failure with a reason; it
never stops the other images.
"""

import dataclasses
import hashlib
import os
import typing
import weakref

import numpy as np

from retrain import images
from retrain.quiet_tensorflow import import_tensorflow

_READ_CHUNK = 1 << 20
_FORWARD = weakref.WeakKeyDictionary()


class FileState(typing.NamedTuple):
    """What identifies a file's content: size, mtime (ns), sha256 hex digest."""

    size: int
    mtime_ns: int
    sha256: str


def file_state(path):
    """The FileState of ``path``, reading the whole file for the digest."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        status = os.fstat(file.fileno())
        while chunk := file.read(_READ_CHUNK):
            digest.update(chunk)
    return FileState(status.st_size, status.st_mtime_ns, digest.hexdigest())


@dataclasses.dataclass
class ExtractedBatch:
    """The outcome for one batch of input files.

    ``positions``: int [n], indices into the ``paths`` given to
    ``bottleneck_batches`` of the files that decoded; ``bottlenecks``: float32
    [n, feature_dim], one row per position; ``states``: FileState per
    position; ``failures``: (index into paths, reason, FileState or None when
    the file could not even be read).
    """

    positions: np.ndarray
    bottlenecks: np.ndarray
    states: list
    failures: list

    def __len__(self):
        return len(self.positions) + len(self.failures)


def _load(path, input_size):
    """(uint8 [h, w, 3] pixels or None, FileState or None, failure reason or None)."""
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())
            content = file.read()
    except OSError as error:
        return None, None, f"cannot read: {error.strerror or error}"
    state = FileState(status.st_size, status.st_mtime_ns, hashlib.sha256(content).hexdigest())
    try:
        return images.decode_rgb(path, input_size, content=content), state, None
    except images.ImageDecodeError as error:
        return None, state, error.reason


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

    def load(index):
        index = int(index)
        pixels, state, reason = _load(paths[index], input_size)
        outcomes[index] = (state, reason)
        if pixels is None:
            return np.zeros((1, 1, 3), np.uint8), False
        return pixels, True

    def prepare(index):
        pixels, decoded = tf.numpy_function(load, [index], [tf.uint8, tf.bool])
        pixels.set_shape([None, None, 3])
        decoded.set_shape([])
        return index, images.resize_to_input(pixels, input_size), decoded

    dataset = (
        tf.data.Dataset.range(len(paths))
        .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    forward = _forward_function(model, input_size)
    feature_dim = model.output_shape[-1]
    for indices, pixels, decoded in dataset:
        indices, decoded = indices.numpy(), decoded.numpy()
        # Failed items ride along as blank images (cheaper than re-batching).
        if decoded.any():
            vectors = forward(pixels).numpy()[decoded]
        else:
            vectors = np.zeros((0, feature_dim), np.float32)
        results = [outcomes.pop(int(i)) for i in indices]
        yield ExtractedBatch(
            positions=indices[decoded],
            bottlenecks=vectors,
            states=[state for (state, _), ok in zip(results, decoded) if ok],
            failures=[
                (int(i), reason, state)
                for i, (state, reason), ok in zip(indices, results, decoded)
                if not ok
            ],
        )
