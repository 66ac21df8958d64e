"""The one dataset builder: image files -> batches of model-ready pixels (tf.data).

``image_batches`` reads, decodes (``decode.load``) and resizes
(``resizing.resize_to_input``) on tf.data's thread pool; the distortion and
fine-tuning paths, the TFLite int8 export's calibration and ``label_image``
take their pixels from it. The cache fill takes the same pixels, as uint8,
from ``decoded_batches.BatchDecoder``, which alternates with the forward pass.

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


def finished(dataset):
    """``dataset`` with our options: tf.data's autotuner off (see the module docstring).

    Options carry through later transformations (map, batch, repeat), so
    applying this where a pipeline is built covers what callers add on top.
    """
    tf = import_tensorflow()
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
