"""The extraction loop: image files -> backbone vectors, in batches.

``extract`` is the one loop every path runs (the single-process cache
update, a ``--num_shards`` process, a Beam worker): it hands each batch's
vectors and failures to a ``write`` callback (the cache's journal or shard
writer), shows progress and warns about each image it skips.

Two threads work at once, with a bounded number of batches between them:

* the engine thread alternates two steps per batch: ``BatchDecoder`` reads,
  hashes, decodes and resizes the batch on every core (simplejpeg, Pillow,
  hashlib and the resize release the GIL), then the engine
  (``retrain.engines``, whose forward pass also uses every core) turns it
  into vectors. Decoding beside the forward pass was slower: both want
  every core (``decoded_batches``);
* the caller's thread receives ExtractedBatch objects and writes them (the
  cache journal's fsync), while the engine thread goes on with the next batch.

In flight at most: ``_QUEUED`` finished batches and the batch being decoded
or run, whatever the number of images. A file that cannot be read or
decoded becomes a failure with a reason; it never stops the other images.
"""

import dataclasses
import logging
import queue
import sys
import threading
import typing

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from retrain.data import decoded_batches
from retrain.files import paths as paths_lib

logger = logging.getLogger(__name__)

# Finished batches waiting for the caller: one being written, one ready.
_QUEUED = 2


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


def bottleneck_batches(paths, engine, input_size, batch_size=32):
    """Yields an ExtractedBatch per ``batch_size`` files, in the order of ``paths``.

    Args:
      paths: list of image file paths.
      engine: an ``engines`` engine (or any callable): uint8 [batch,
        input_size, input_size, 3] RGB -> float32 [batch, feature_dim].
      input_size: int, the model's square input side.
      batch_size: int, images per engine call.

    Memory stays bounded by the batch size (see the module docstring).
    Closing the generator early stops the engine thread after its batch.
    """
    finished = queue.Queue(maxsize=_QUEUED)
    stop = threading.Event()

    def hand_over(item):
        """Queues ``item`` for the caller; False once the caller has stopped."""
        while not stop.is_set():
            try:
                finished.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run_engine():
        try:
            with decoded_batches.BatchDecoder(input_size, hash_files=True) as decode:
                for start in range(0, len(paths), batch_size):
                    files = paths[start : start + batch_size]
                    pixels, decoded, outcomes = decode(files)
                    batch = _forward(engine, start, pixels, decoded, outcomes)
                    if not hand_over(batch):
                        return
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            hand_over(error)
            return
        hand_over(None)

    thread = threading.Thread(target=run_engine, name="retrain-engine", daemon=True)
    thread.start()
    try:
        while (item := finished.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _forward(engine, start, pixels, decoded, outcomes):
    """One batch through the engine: an ExtractedBatch (per-batch numpy work).

    ``start``: the index in ``paths`` of the batch's first file; ``pixels``,
    ``decoded`` and ``outcomes``: ``BatchDecoder``'s.
    """
    if decoded.all():
        vectors = np.asarray(engine(pixels), dtype=np.float32)
    elif decoded.any():
        vectors = np.asarray(engine(pixels[decoded]), dtype=np.float32)
    else:
        vectors = np.zeros((0, 0), np.float32)
    indices = np.arange(start, start + len(outcomes))
    return ExtractedBatch(
        positions=indices[decoded],
        bottlenecks=vectors,
        states=[outcome.state for outcome, ok in zip(outcomes, decoded) if ok],
        failures=[
            (int(i), outcome.reason, outcome.state if outcome.lasting else None)
            for i, outcome, ok in zip(indices, outcomes, decoded)
            if not ok
        ],
    )


class ImageVector(typing.NamedTuple):
    """An image that went through the engine: its entry, FileState and float32 [feature_dim]."""

    entry: typing.Any
    state: typing.Any
    vector: np.ndarray


class ImageFailure(typing.NamedTuple):
    """An image that could not be read or decoded.

    ``state``: its FileState, or None when the failure is not the file's to
    remember (see ``ExtractedBatch``).
    """

    entry: typing.Any
    reason: str
    state: typing.Any


class EntryBatch(typing.NamedTuple):
    """One batch of ``extract``, in terms of the entries it was given."""

    vectors: list
    failures: list


class Extraction(typing.NamedTuple):
    """What ``extract`` did: images extracted, and (relative path, reason) of failures."""

    extracted: int
    failed: list


def extract(image_dir, entries, engine, input_size, write, batch_size=32, progress=True):
    """Runs the engine over ``entries`` and hands each batch to ``write``.

    Images that cannot be read or decoded are warned about (one line each)
    and handed over as ImageFailure.

    Args:
      image_dir: the folder ``entries`` are relative to (path or URL).
      entries: list of images.ImageEntry.
      engine: float32 [b, input_size, input_size, 3] RGB in [0, 255] ->
        float32 [b, feature_dim].
      input_size: int, the backbone's square input side.
      write: called with an EntryBatch per batch, in the order of ``entries``.
      batch_size: int, images per engine call.
      progress: show a progress bar on stderr.

    Returns:
      Extraction.
    """
    if not entries:
        return Extraction(0, [])
    files = [paths_lib.join(image_dir, entry.relative_path) for entry in entries]
    extracted, failed = 0, []
    with (
        logging_redirect_tqdm(),
        tqdm(
            total=len(entries),
            desc="bottlenecks",
            unit="img",
            file=sys.stderr,
            disable=not progress,
            smoothing=0.1,
        ) as bar,
    ):
        for batch in bottleneck_batches(files, engine, input_size, batch_size):
            done = EntryBatch(
                vectors=[
                    ImageVector(entries[position], state, vector)
                    for position, state, vector in zip(
                        batch.positions, batch.states, batch.bottlenecks
                    )
                ],
                failures=[
                    ImageFailure(entries[position], reason, state)
                    for position, reason, state in batch.failures
                ],
            )
            for failure in done.failures:
                failed.append((failure.entry.relative_path, failure.reason))
                logger.warning("skipped %s: %s", failure.entry.relative_path, failure.reason)
            write(done)
            extracted += len(batch.positions)
            bar.update(len(batch))
    return Extraction(extracted, failed)
