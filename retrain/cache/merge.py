"""The merge: journal and shard files folded into a new main file, newest record winning.

``fold`` writes the main rows plus every pending record into a temporary
file beside ``<name>.h5`` and renames it over the main file
(``retrain.files.atomic_write``), and only then deletes the journal and the
merged shard files, so a kill at any instant leaves the old main file or the
new one plus records the next fold merges again. Before writing, the space
the new file needs is estimated (``_estimate``): a merge that cannot fit is
deferred. Callers hold the cache lock.
"""

import logging
import os
import re
import shutil
import typing
from pathlib import Path

import numpy as np

from retrain.cache import shards, store
from retrain.cache.journal import INDEX_NAMES, Failure, Journal, UnreadableCache, folders
from retrain.files import atomic_write

logger = logging.getLogger(__name__)


class Folded(typing.NamedTuple):
    """What ``fold`` did: ``merged`` shard files (deleted), and ``deferred``:
    None, or the one-line reason the merge was put off (too little free space)."""

    merged: int
    deferred: typing.Optional[str]


def fold(path, identity, images_per_second=None):
    """Merges the journal and every finished shard file into the main file.

    Also removes what killed runs left behind (temporary files, stale shard
    temporaries). The newest record of a key wins (journal files are newer
    than shard files); main rows it replaces are dropped. A shard file that
    cannot be used is renamed aside with a warning, never merged. When the
    new main file would not fit on the disk, nothing is written: the journal
    and shard files stay, are read beside the main file (``view.CacheView``)
    and are merged by a later fold with space. ``images_per_second``: the
    extraction speed to record in the new file (``store.RATE``; default:
    the old file's).

    Returns:
      Folded.
    """
    path = Path(path)
    journal = Journal(path, identity)
    for leftover in atomic_write.leftovers(path.parent, path):
        leftover.unlink()
    if journal.folder.is_dir():
        for leftover in atomic_write.leftovers(journal.folder):
            leftover.unlink()
    shards.remove_stale_partials(path.parent, path.name)
    sources = pending_sources(str(path.parent), path, identity)
    if not sources:
        return Folded(0, None)
    winners, journal_keys = newest_records(sources)
    main = store.open_or_set_aside(path, identity)
    try:
        needed, free = _space(path, identity, main, winners, journal_keys)
        if needed > free:
            return Folded(
                0,
                f"merge deferred: needs {needed / 1e6:.1f} MB, {free / 1e6:.1f} "
                f"MB free in {path.parent}; the journal keeps the new vectors",
            )
        with atomic_write.atomic_path(path) as temporary:
            try:
                store.write_main(
                    temporary, identity, main, winners, journal_keys, images_per_second
                )
            except RuntimeError as error:
                raise _as_os_error(error, temporary) from None
    finally:
        if main is not None:
            main.close()
    if any(not source.shard for source in sources):
        journal.clear()
    merged = [winner.source.file for winner in winners if winner.source.shard]
    for file in merged:
        os.unlink(file)
    return Folded(len(merged), None)


class _Source(typing.NamedTuple):
    """A journal or shard file to merge, and how to load its arrays."""

    file: object
    load: typing.Callable
    shard: bool


def pending_sources(folder, path, identity):
    """The records not merged into the main file ``path`` yet, oldest first:
    finished shard files in ``folder`` (a path or URL), then journal files."""
    sources = [
        _Source(file, _shard_loader(identity), True)
        for file in shards.finished(folder, Path(path).name)
    ]
    journal = Journal(path, identity)
    return sources + [_Source(file, journal.load, False) for file in journal.files()]


def _shard_loader(identity):
    return lambda file, names=None: shards.load(file, identity, names)


class Winner(typing.NamedTuple):
    """The records of one journal or shard file that no newer file replaces.

    ``rows``: int64 [n] positions in the file's row arrays; ``index``: their
    ``key``, ``size``, ``mtime_ns``, ``sha256`` and ``folder`` arrays [n];
    ``text_bytes``: int, the utf-8 length of their relative paths; ``failures``:
    {str key: Failure} of its winning failures.
    """

    source: _Source
    rows: np.ndarray
    index: dict
    text_bytes: int
    failures: dict


def _space(path, identity, main, winners, journal_keys):
    """(bytes the new main file needs, bytes free on its disk).

    HDF5 reports a full disk only when the file is closed, and h5py crashes
    the process (segmentation fault) when that failed file object is freed;
    so the space is checked before writing. The new file is written beside
    the old one, so its whole size is needed (``_estimate``).
    """
    rows = sum(len(winner.rows) for winner in winners)
    text = sum(winner.text_bytes for winner in winners)
    failures = sum(len(winner.failures) for winner in winners)
    if main is not None:
        main_keep = ~np.isin(main.keys, np.array(sorted(journal_keys), dtype="S64"))
        rows += int(main_keep.sum())
        text += main.text_bytes(main_keep)
        failures += sum(1 for key in main.failures if key.encode() not in journal_keys)
    needed = _estimate(identity, rows, text, failures)
    return needed, shutil.disk_usage(path.parent).free


def _estimate(identity, rows, text_bytes, failures):
    """Bytes of a main file of ``rows`` rows and ``failures`` failures, at most
    1.5x what h5py writes (tests/test_cache_space.py measures it).

    Measured with h5py 3 / HDF5 1.14: bottlenecks take whole chunks; a row's
    fixed fields take 176 bytes (key 64, sha256 64, folder 16, size and
    mtime 8 each, the variable-length string's reference 16) and its path a
    global-heap object (16-byte header, data padded to 8 bytes); the file's
    own structures (superblock, object headers, chunk B-tree) about 10 kB.
    """
    chunks = -(-rows // store.CHUNK_ROWS)
    vectors = chunks * store.CHUNK_ROWS * identity.feature_dim * np.dtype(identity.dtype).itemsize
    # Rounded up (176 + 16 + 8 for the padding, plus slack for partly filled
    # heap collections): a run that waits for space costs more than 5%.
    per_row = 256
    # A failure: key, size, mtime, folder, two strings' references and heap
    # objects; its reason is a short sentence.
    per_failure = 256 + 512
    return (
        vectors
        + rows * per_row
        + text_bytes * 11 // 10
        + failures * per_failure
        + chunks * 64
        + (64 << 10)
    )


def _as_os_error(error, path):
    """h5py reports a failed write (disk full, I/O error) as a RuntimeError that
    quotes the errno; it becomes the OSError it is, so callers report it as one."""
    found = re.search(r"errno = (\d+)", str(error))
    if not found:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def newest_records(sources, set_aside=True):
    """The surviving records, [Winner] (newest file first), and all their keys (bytes).

    ``sources``: _Source list, oldest first (``pending_sources``); unusable
    ones are left out, with a warning and (``set_aside``: under the cache
    lock) a damaged shard file renamed aside; files that vanished are left
    out too (a process without the lock reads while another merges).
    """
    seen, winners = set(), []
    for source in reversed(sources):
        try:
            # The vectors are read when they are written (store.write_main).
            arrays = source.load(source.file, INDEX_NAMES)
        except FileNotFoundError:
            continue
        except UnreadableCache as error:
            if not set_aside:
                continue
            if source.shard:
                shards.set_aside(source.file, error)
            else:
                logger.warning("discarding damaged journal file %s (%s)", source.file, error)
            continue
        winners.append(_winner(source, arrays, seen))
    return winners, seen


def _winner(source, arrays, seen):
    """The Winner of one file's ``arrays``; adds its keys to ``seen``."""
    kept = ([], [])
    for kind, name in enumerate(("key", "failed_key")):
        for row, key in enumerate(arrays[name]):
            if key not in seen:
                seen.add(key)
                kept[kind].append(row)
    rows = np.array(kept[0], np.int64)
    index = {name: arrays[name][rows] for name in ("key", "size", "mtime_ns", "sha256")}
    index[store.FOLDER] = folders(arrays)[rows]
    failed_folders = folders(arrays, "failed_")
    failures = {
        arrays["failed_key"][row].decode(): Failure(
            arrays["failed_relative_path"][row].decode(),
            int(arrays["failed_size"][row]),
            int(arrays["failed_mtime_ns"][row]),
            arrays["failed_reason"][row].decode(),
            failed_folders[row].decode(),
        )
        for row in kept[1]
    }
    text = sum(len(text) for text in arrays["relative_path"][rows])
    return Winner(source, rows, index, text, failures)
