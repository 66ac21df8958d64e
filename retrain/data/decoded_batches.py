"""The cache fill's feed: a batch of image files -> uint8 pixels, on every core at once.

``BatchDecoder`` reads, hashes, decodes (``decode.load``) and resizes
(``resizing.resize_uint8``) one batch with one thread per core, and returns
when the whole batch is done. The extraction loop alternates it with the
forward pass (``retrain.engines.extraction``): decoding never runs beside
the backbone, whose XNNPACK threads already use every core. On 2 cores with
500x375 photos that alternation filled 6% (float LiteRT) and 12% (int8)
more images a second than decoding on tf.data's threads beside the forward
pass, where the threads took turns on the cores and spent more CPU per
image (12.3 against 11.6 ms float, 8.3 against 7.5 int8; docs/benchmarks.md).

The values are ``resize_to_input``'s (the resize rounds to whole levels), as
uint8: a quarter of float32's bytes. Training and ``label_image`` take
their pixels from ``pixel_batches.image_batches`` (tf.data), which decodes
and resizes the same way.
"""

import concurrent.futures
import os

import numpy as np

from retrain.data.decode import load
from retrain.data.resizing import resize_uint8


def cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class BatchDecoder:
    """Decodes batches of image files with one thread per core; a context manager.

    Each thread takes every ``threads``-th file of the batch, so the threads
    finish within one image of each other. simplejpeg, Pillow, hashlib and
    the resize release Python's lock, so the threads decode in parallel.
    """

    def __init__(self, input_size: int, hash_files: bool = True, threads: int | None = None):
        self.input_size = input_size
        self.hash_files = hash_files
        self.threads = threads or cores()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.threads, thread_name_prefix="retrain-decode"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __call__(self, paths):
        """Decodes ``paths`` (a batch; a file that fails never stops the others).

        Returns (pixels uint8 [n, input_size, input_size, 3] RGB, zeros where
        a file failed; ok bool [n]; outcomes: a ``decode.Outcome`` per path).
        """
        count = len(paths)
        pixels = np.zeros((count, self.input_size, self.input_size, 3), np.uint8)
        ok = np.zeros(count, bool)
        outcomes = [None] * count

        def decode_share(first):
            for index in range(first, count, self.threads):
                decoded, outcomes[index] = load(paths[index], self.input_size, self.hash_files)
                if decoded is not None:
                    pixels[index] = resize_uint8(decoded, self.input_size)
                    ok[index] = True

        # list() re-raises the first error of a thread (not a file's: load
        # turns those into Outcomes) in the caller.
        list(self._pool.map(decode_share, range(min(self.threads, count))))
        return pixels, ok, outcomes
