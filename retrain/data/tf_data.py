"""The options every tf.data pipeline of ours runs with (``finished``).

tf.data's autotuner is off. Its model thread wakes up on a doubling period
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

from retrain.quiet_tensorflow import import_tensorflow


def finished(dataset):
    """``dataset`` with our options: tf.data's autotuner off (see the module docstring).

    Options carry through later transformations (map, batch, repeat), so
    applying this where a pipeline is built covers what callers add on top.
    """
    tf = import_tensorflow()
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
