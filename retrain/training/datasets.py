"""Training data as tf.data pipelines: (bottleneck or pixels, label), never whole arrays.

Three sources feed the one fit loop in `retrain.training.fit`:

* cached: bottlenecks streamed from the HDF5 cache block by block, in a new
  random block order every epoch, through a shuffle buffer of bounded size, so
  a cache larger than memory trains;
* distorted: decoded, randomly distorted images run through the frozen
  backbone on the fly (the cache is not read or written for them);
* decoded pixels for fine-tuning, distorted or not.

Validation and test sets of the cached and distortion paths are cached
vectors; fine-tuning changes the backbone, so it scores decoded pixels.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from retrain.data import images, pixel_batches
from retrain.data.sampling import sample_rows
from retrain.quiet_tensorflow import import_tensorflow

tf = import_tensorflow()
logger = logging.getLogger(__name__)

# Vectors held by the shuffle buffer of the cached path: 16,384 x 1,280
# float32 is 84 MB, whatever the size of the cache. Blocks come in a random
# order, so the buffer mixes images from all over the cache.
SHUFFLE_BUFFER = 16384
# Validation vectors the head is scored on when all are asked for
# (validation_batch_size -1): 50,000 x 1,280 float32 is 256 MB, held for the
# whole training; a larger validation set is sampled (with the seed) to this
# size, so memory stays flat in the set's size.
MOST_VALIDATION_VECTORS = 50_000


def cached_training(
    cache, entries, batch_size: int, seed: int, shuffle_buffer: int = SHUFFLE_BUFFER
):
    """Endless shuffled training batches of cached bottlenecks.

    Args:
      cache: a BottleneckCache holding every entry.
      entries: the training ImageEntry list.
      batch_size: vectors per batch.
      seed: makes the block order and the shuffle reproducible.
      shuffle_buffer: most vectors held for shuffling.

    Returns:
      tf.data.Dataset, repeating, of (float32 [batch_size, feature_dim],
      int64 [batch_size] labels).

    A training set that fits in the shuffle buffer (the usual case: 16,384
    vectors) is read once and reshuffled in memory every epoch, within the
    same memory bound: streaming it costs about 2 ms a step in tf.data's
    per-vector unbatch and shuffle, which made the stream, not the head,
    most of a warm rerun's training time.

    Raises RetrainError at once if an entry is missing from the cache.
    """
    labels = images.labels_of(entries)
    if len(entries) <= shuffle_buffer:
        return array_training(cache.read(entries), labels, batch_size, seed)
    cache.stream(entries).close()  # errors now, not inside tf.data
    epochs = itertools.count()

    def blocks():
        for positions, vectors in cache.stream(entries, order_seed=seed + next(epochs)):
            yield vectors, labels[positions]

    feature_dim = cache.identity.feature_dim
    dataset = tf.data.Dataset.from_generator(
        blocks,
        output_signature=(
            tf.TensorSpec([None, feature_dim], tf.float32),
            tf.TensorSpec([None], tf.int64),
        ),
    )
    return pixel_batches.finished(
        dataset.repeat()
        .unbatch()
        .shuffle(min(shuffle_buffer, len(entries)), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .prefetch(2)
    )


def array_training(vectors: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    """Endless shuffled batches of (float32 [b, d], int64 [b]) from arrays already in memory."""
    return pixel_batches.finished(
        tf.data.Dataset.from_tensor_slices((vectors, labels))
        .shuffle(len(vectors), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size)
        .prefetch(2)
    )


def cached_sample(
    cache, entries, size: int, seed: int, most: int = MOST_VALIDATION_VECTORS
) -> tuple[np.ndarray, np.ndarray]:
    """Bottlenecks float32 [k, d] and labels int64 [k] of a random sample of entries.

    `size` -1 takes them all, up to `most` (a random sample of that size
    beyond); a size of at least len(entries) takes them all. Entries keep
    their order; the sample is drawn once with `seed`, so evaluations stay
    comparable.
    """
    labels = images.labels_of(entries)
    if size == -1:
        size = most
        if len(entries) > most:
            logger.warning(
                "%d validation images: the head is scored on a fixed random %d of them "
                "(--validation_batch_size -1 takes at most %d; give a size to choose).",
                len(entries),
                most,
                most,
            )
    if 0 < size < len(entries):
        chosen = sample_rows(len(entries), size, seed)
        entries, labels = [entries[i] for i in chosen], labels[chosen]
    return cache.read(entries), labels


def decoded_training(image_dir, entries, input_size: int, batch_size: int, seed: int, distort=None):
    """Endless shuffled batches of decoded (optionally distorted) training images.

    Images that cannot be decoded are left out. Random distortions draw anew
    for every image in every epoch (one iterator runs through all epochs).

    Returns:
      tf.data.Dataset of (float32 [b, input_size, input_size, 3] RGB in
      [0, 255], int64 [b] labels).
    """
    labels = tf.constant(images.labels_of(entries))
    paths = [image_dir / entry.relative_path for entry in entries]
    batches = pixel_batches.image_batches(
        paths, input_size, batch_size, distort=distort, shuffle_seed=seed, drop_failed=True
    )
    return batches.map(lambda index, pixels, ok: (pixels, tf.gather(labels, index))).repeat()


def decoded_evaluation(image_dir, entries, input_size: int, batch_size: int):
    """Batches of decoded plain images in entry order, for validation or test.

    Returns:
      tf.data.Dataset of (float32 [b, input_size, input_size, 3] RGB in
      [0, 255], int64 [b] labels); one pass.
    """
    labels = tf.constant(images.labels_of(entries))
    paths = [image_dir / entry.relative_path for entry in entries]
    batches = pixel_batches.image_batches(paths, input_size, batch_size)
    return batches.map(lambda index, pixels, ok: (pixels, tf.gather(labels, index)))


def through_backbone(pixel_batches, backbone):
    """Maps (pixels, label) batches to (bottleneck float32 [b, d], label) with a frozen backbone.

    The backbone runs in inference mode inside the tf.data pipeline, so the
    head's fit loop is the same as on cached vectors.
    """
    forward = tf.function(lambda pixels: backbone(pixels, training=False))
    return pixel_batches.map(lambda pixels, labels: (forward(pixels), labels)).prefetch(2)
