"""The one dataset builder: image files -> batches of model-ready pixels (tf.data).

``image_batches`` reads, decodes (``decode.load``) and resizes
(``resizing.resize_to_input``) on tf.data's thread pool; cache extraction, the
distortion and fine-tuning paths, the int8 calibration and ``label_image``
all take their pixels from it. ``numpy_batches`` is its twin for cache
extraction: the same ``decode.load`` and ``resize_to_input`` on a plain
thread pool, numpy in and out, without tf.data's ``numpy_function`` hop.

``finished`` gives every tf.data pipeline of ours its options: tf.data's
autotuner is off. Its model thread wakes up on a doubling period
(10 ms, 20 ms, ... up to about 10 s), and destroying an iterator waits for
its next wake-up (TensorFlow 2.21, measured here): the end of a cache fill
stalled for up to 5.5 s of a 20 s run, and a head-training stream's
iterator took 0.26 s to go after 1 s of use, 2.1 s after 3 s. The thread
also takes CPU from the work: that stream gave 3,911 batches in its first
second with it, 7,357 without.

Without the autotuner, ``num_parallel_calls=tf.data.AUTOTUNE`` means one
call per CPU core, and prefetch buffers are the fixed sizes we set, so memory
stays what the pipeline says.
"""

import collections
import concurrent.futures
import os

import numpy as np

from retrain.data.decode import load
from retrain.data.resizing import resize_to_input
from retrain.quiet_tensorflow import import_tensorflow

_BATCHES_AHEAD = 2


def image_batches(
    paths,
    input_size,
    batch_size,
    *,
    distort=None,
    outcomes=None,
    hash_files=False,
    shuffle_seed=None,
    drop_failed=False,
):
    """The one dataset builder: image files -> batches of model-ready pixels.

    Reading and decoding (Pillow, ``decode_rgb``) and resizing run on tf.data's
    thread pool (both release the GIL), two batches are prefetched, so whoever
    consumes the batches (a backbone, a training step) rarely waits, and
    memory does not grow with the number of images.

    Args:
      paths: sequence of image file paths (str or Path).
      input_size: int, the backbone's square input side.
      batch_size: int, images per batch (the last batch may be smaller).
      distort: None, or a function float32 [input_size, input_size, 3] RGB in
        [0, 255] -> the same shape and range, built from TensorFlow ops and
        run per image after resizing; random ops draw anew every epoch.
      outcomes: None, or a dict this fills from index (into ``paths``) to
        ``Outcome`` for every image read. The consumer pops entries as it
        uses them.
      hash_files: give every Outcome the file's FileState (size, mtime and
        the sha256 of exactly the bytes decoded); costs a hash per image.
      shuffle_seed: None keeps the order of ``paths``; an int shuffles it,
        anew at every iteration (epoch), reproducibly.
      drop_failed: leave images that cannot be read or decoded out of the
        batches (training); otherwise they ride along as black images with
        ``ok`` False (cheaper than re-batching, and the caller can report them).

    Returns:
      tf.data.Dataset of (index int64 [b], pixels float32 [b, input_size,
      input_size, 3] RGB in [0, 255], ok bool [b]).
    """
    tf = import_tensorflow()
    paths = [str(path) for path in paths]

    def read(index):
        index = int(index)
        pixels, outcome = load(paths[index], input_size, hash_files)
        if outcomes is not None:
            outcomes[index] = outcome
        if pixels is None:
            return np.zeros((input_size, input_size, 3), np.float32), False
        return resize_to_input(pixels, input_size), True

    def prepare(index):
        pixels, ok = tf.numpy_function(read, [index], [tf.float32, tf.bool])
        pixels.set_shape([input_size, input_size, 3])
        ok.set_shape([])
        if distort is not None:
            pixels = distort(pixels)
        return index, pixels, ok

    dataset = tf.data.Dataset.range(len(paths))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.map(
        prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=shuffle_seed is None
    )
    if drop_failed:
        dataset = dataset.filter(lambda index, pixels, ok: ok)
    # A fixed prefetch, not AUTOTUNE (whose buffer may grow with free RAM):
    # memory stays flat in the number of images, and two ready batches are
    # enough to keep a consumer that is slower than decoding busy.
    return finished(dataset.batch(batch_size).prefetch(_BATCHES_AHEAD))


def numpy_batches(paths, input_size, batch_size, outcomes, hash_files=True, workers=None):
    """``image_batches``' pixels without tf.data: numpy batches from a thread pool.

    Cache extraction's feed. Each image is read, hashed, decoded and resized
    (``decode.load``, ``resize_to_input``: the same pixels as
    ``image_batches``) by one of ``workers`` threads (default: one per core);
    Pillow, hashlib and the resize release the GIL, so they run beside the
    engine. No tf.data: no ``numpy_function`` hop per image (0.25 ms on one
    thread, ``benchmarks/profile_extraction.py``), no tensor copies, and no
    TensorFlow needed to fill a cache with the LiteRT engine. At most
    ``_BATCHES_AHEAD`` + 1 batches of images are in flight, whatever the
    number of images.

    Args:
      paths: sequence of image file paths (str or Path).
      input_size: int, the backbone's square input side.
      batch_size: int, images per batch (the last batch may be smaller).
      outcomes: dict this fills from index (into ``paths``) to ``Outcome``
        for every image read; the consumer pops entries as it uses them.
      hash_files: give every Outcome the file's FileState (see ``image_batches``).
      workers: int, decoding threads.

    Yields:
      (index int64 [b], pixels float32 [b, input_size, input_size, 3] RGB in
      [0, 255], ok bool [b]) numpy arrays; an image that cannot be read or
      decoded rides along black with ``ok`` False. Closing the generator
      cancels what is queued and waits for the images being decoded.
    """
    paths = [str(path) for path in paths]
    workers = workers or _cores()

    def read(index):
        pixels, outcome = load(paths[index], input_size, hash_files)
        outcomes[index] = outcome
        return None if pixels is None else resize_to_input(pixels, input_size)

    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="retrain-decode")
    pending = collections.deque()
    submitted = 0
    try:
        for start in range(0, len(paths), batch_size):
            # Keep the pool _BATCHES_AHEAD batches ahead of the consumer.
            ahead = min(len(paths), start + (_BATCHES_AHEAD + 1) * batch_size)
            for index in range(submitted, ahead):
                pending.append(pool.submit(read, index))
            submitted = max(submitted, ahead)
            stop = min(len(paths), start + batch_size)
            pixels = np.zeros((stop - start, input_size, input_size, 3), np.float32)
            ok = np.zeros(stop - start, bool)
            for row in range(stop - start):
                resized = pending.popleft().result()
                if resized is not None:
                    pixels[row], ok[row] = resized, True
            yield np.arange(start, stop, dtype=np.int64), pixels, ok
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _cores():
    """CPU cores this process may run on (tf.data's AUTOTUNE parallelism)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def finished(dataset):
    """``dataset`` with our options: tf.data's autotuner off (see the module docstring).

    Options carry through later transformations (map, batch, repeat), so
    applying this where a pipeline is built covers what callers add on top.
    """
    tf = import_tensorflow()
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
