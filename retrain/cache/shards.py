"""Shards: cache records written beside the cache by any number of writers.

A shard file is ``<cache name>.shard-<label>-<token>-<n>.npz`` in the cache's
folder: ``label`` says who wrote it (``3of8`` for ``--num_shards 8
--shard_index 3``, ``beam`` for the Beam pipeline), ``token`` is random per
writer, so K processes on K machines sharing a folder never collide, and
``n`` numbers the writer's files. Each holds up to ``chunk_rows`` records in
the journal's format, with the cache identity, and is written under a
temporary name and then renamed (``retrain.files.atomic_write``; ``<name>.partial``
for a URL), so it is whole or absent: a killed writer leaves at most one
temporary file, which nothing reads, and its images are extracted again by
the next run. ``merge.fold`` merges every finished shard
into the main file, under the cache lock, and then deletes it.

A folder given as a URL (``gs://bucket/cache``, anything ``tf.io.gfile``
supports) is written and listed through TensorFlow; local folders use the
operating system directly, with fsync, like the journal.
"""

import io
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np

from retrain.cache.journal import Records, load_arrays, to_arrays
from retrain.errors import RetrainError
from retrain.files import atomic_write, paths
from retrain.quiet_tensorflow import import_tensorflow

logger = logging.getLogger(__name__)

CHUNK_ROWS = 1024
# A shard's temporary file lives only while it is written (well under a
# second); one older than this belongs to a writer that was killed.
STALE_PARTIAL_SECONDS = 3600.0
_PARTIAL = ".partial"


def in_part(key, num_shards, shard_index):
    """Whether the image of cache ``key`` (sha256 hex) belongs to shard ``shard_index``.

    The key is a uniform hash, so the K parts have nearly equal sizes and an
    image's part depends only on its relative path.
    """
    return int(key, 16) % num_shards == shard_index


def finished(folder, cache_name):
    """The finished shard files of the cache ``cache_name`` in ``folder``, sorted."""
    pattern = f"{cache_name}.shard-*.npz"
    if paths.is_url(folder):
        return sorted(import_tensorflow().io.gfile.glob(paths.join(folder, pattern)))
    folder = Path(folder)
    return sorted(str(path) for path in folder.glob(pattern)) if folder.is_dir() else []


def load(path, identity, names=None):
    """The arrays of one shard file (see ``journal.load_arrays``); UnreadableCache."""
    if paths.is_url(path):
        with import_tensorflow().io.gfile.GFile(path, "rb") as file:
            return load_arrays(file, identity, names)
    with open(path, "rb") as file:
        return load_arrays(file, identity, names)


def set_aside(path, reason):
    """Renames an unusable shard file to ``<name>.unused`` (kept, never read again)."""
    aside = f"{path}.unused"
    os.replace(path, aside)
    logger.warning("not merging shard file %s (%s); moved it to %s", path, reason, aside)


def remove_stale_partials(folder, cache_name, now=None):
    """Deletes the temporary files of killed shard writers (older than STALE_PARTIAL_SECONDS)."""
    now = time.time() if now is None else now
    if not Path(folder).is_dir():
        return
    for path in atomic_write.leftovers(folder):
        if not path.name.startswith(f".{cache_name}.shard-"):
            continue
        try:
            if now - path.stat().st_mtime > STALE_PARTIAL_SECONDS:
                path.unlink()
        except FileNotFoundError:
            pass  # its writer just renamed it


class ShardWriter:
    """Writes records into shard files of ``chunk_rows`` records each.

    Has the journal's ``append(records)``, so the extraction loop writes to
    either. Records are buffered until ``chunk_rows`` are held; call
    ``close()`` to write the rest. ``files``: the shard files written.

    Args:
      folder: the cache's folder (a local path or a ``tf.io.gfile`` URL).
      cache_name: the main cache file's name, e.g. ``efficientnet_lite0-<fp>-float16.h5``.
      identity: the cache's CacheIdentity, stored in every file.
      label: who writes, e.g. ``"0of2"`` or ``"beam"`` (letters, digits).
      chunk_rows: records per file (about 2.6 KB each in float16).
    """

    def __init__(self, folder, cache_name, identity, label, chunk_rows=CHUNK_ROWS):
        if not label.isalnum():
            raise RetrainError(f"label must be letters and digits. Received: label={label!r}")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise RetrainError(
                f"chunk_rows must be a positive int. Received: chunk_rows={chunk_rows!r}"
            )
        self.folder = str(folder)
        self.identity = identity
        self.chunk_rows = chunk_rows
        self.files = []
        self._prefix = f"{cache_name}.shard-{label}-{uuid.uuid4().hex[:16]}"
        self._buffer = Records()

    def append(self, records):
        self._buffer.extend(records)
        if len(self._buffer) >= self.chunk_rows:
            self._write()

    def close(self):
        """Writes the buffered records, if any."""
        if len(self._buffer):
            self._write()

    def _write(self):
        path = paths.join(self.folder, f"{self._prefix}-{len(self.files) + 1:06d}.npz")
        buffer = _npz_bytes(to_arrays(self._buffer, self.identity))
        if paths.is_url(path):
            gfile = import_tensorflow().io.gfile
            gfile.makedirs(self.folder)
            with gfile.GFile(path + _PARTIAL, "wb") as file:
                file.write(buffer)
            gfile.rename(path + _PARTIAL, path, overwrite=True)
        else:
            atomic_write.write_bytes(path, buffer)
        self.files.append(path)
        self._buffer = Records()


def _npz_bytes(arrays):
    stream = io.BytesIO()
    np.savez(stream, **arrays)
    return stream.getvalue()
