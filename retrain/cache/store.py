"""The bottleneck cache on disk: one HDF5 file, a journal, crash-safe writes.

A SIGKILL or a power cut in the middle of an HDF5 write can leave a file that
no longer opens, so the main file ``<name>.h5`` is never written in place:

* extraction appends each finished batch to the journal folder
  ``<name>.h5.journal/`` as one small ``.npz`` file, written to a temporary
  name, fsynced and renamed (a journal file is whole or absent);
* ``fold`` writes the main rows plus the journal into a temporary file beside
  ``<name>.h5`` and renames it over the main file (``retrain.files.atomic_write``),
  and only then deletes the journal.

Shard files (``shards``), written beside the main file by other processes,
are merged by ``fold`` the same way and deleted after the rename.

A kill at any instant leaves the old main file or the new one, plus journal
and shard files that the next ``fold`` merges again; a key is stored once, the newest
record winning, so nothing is duplicated. Callers hold the cache lock.

Layout of the main file (``FORMAT_VERSION`` 1), one row per image:
``images/key`` S64 (sha256 hex of the relative path), ``images/relative_path``
(utf-8), ``images/size`` and ``images/mtime_ns`` int64, ``images/sha256`` S64
(content digest), ``images/folder`` S16 (``plan.folder_id`` of the image
folder the row was extracted from; absent in files written before it
existed, read as b"" = unknown), ``images/bottleneck`` [rows, feature_dim]
in the cache dtype; ``failed/*`` the same for images that could not be
decoded, with ``reason`` instead of digest and bottleneck. File attributes hold the backbone name,
fingerprint, feature_dim, dtype and format version, checked on every open.
"""

import dataclasses
import datetime
import errno
import logging
import os
import re
import shutil
import typing
from pathlib import Path

import h5py
import numpy as np

from retrain.files import atomic_write
from retrain.cache import hdf5_checks, shards
from retrain.cache.journal import Failure, Journal, UnreadableCache, folders

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_BLOCK_ROWS = 4096
_CHUNK_ROWS = 256
_TEXT = h5py.string_dtype("utf-8")
_ROW_FIELDS = ("key", "relative_path", "size", "mtime_ns", "sha256", "bottleneck")
_FAILED_FIELDS = ("key", "relative_path", "size", "mtime_ns", "reason")
# Optional in both groups: files written before it existed lack it.
_FOLDER = "folder"
# What each dataset of ``images`` and ``failed`` must hold, checked before it
# is read (``hdf5_checks``): dtype (or text) and number of dimensions; the
# bottleneck's dtype is the identity's. The optional ones may be absent (files
# written before they existed).
_FIELD_TYPES = {
    "key": ("S64", 1), "relative_path": (hdf5_checks.TEXT, 1), "size": (np.int64, 1),
    "mtime_ns": (np.int64, 1), "sha256": ("S64", 1), "reason": (hdf5_checks.TEXT, 1),
    "folder": ("S16", 1),
}
_OPTIONAL_FIELDS = ("folder",)


@dataclasses.dataclass(frozen=True)
class CacheIdentity:
    """What a cache file must have been built with to be used.

    Everything that changes the vectors is here: the backbone and its
    fingerprint, the inference ``engine`` ("keras" or "litert": their vectors
    differ in the last float32 bits) and ``pixels``, the decoding and resizing
    settings (``decode.PIXEL_SETTINGS_ID``); ``dtype`` is the storage type.
    ``file_name`` puts all of them in the name, so a change opens another
    file and never mixes vectors.
    """

    backbone: str
    fingerprint: str
    feature_dim: int
    dtype: str
    engine: str
    pixels: str

    def attributes(self):
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            "feature_dim": self.feature_dim,
            "dtype": self.dtype,
            "engine": self.engine,
            "pixels": self.pixels,
        }

    def file_name(self):
        """``<backbone>-<fingerprint[:16]>-<engine>-<pixels>-<dtype>.h5``."""
        return (f"{self.backbone}-{self.fingerprint[:16]}-{self.engine}-{self.pixels}-"
                f"{self.dtype}.h5")


class CacheFile:
    """The main cache file, opened for reading: index in memory, vectors on disk.

    ``keys`` (S64 [rows]), ``size``, ``mtime_ns`` (int64 [rows]) and
    ``sha256`` (S64 [rows]) describe each row's file; ``rows`` maps the str
    key -> row number; ``failures`` maps str key -> Failure. Raises
    UnreadableCache for anything that is not a complete file of this identity,
    and OSError (with its errno) when the file cannot be opened for a reason
    that is not its content.
    """

    def __init__(self, path, identity):
        self.path = Path(path)
        # A FIFO would block h5py's open forever and a symbolic link would read
        # another file: both are refused before anything is opened.
        self._size = hdf5_checks.check_regular_file(self.path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            if error.errno is not None:
                # Permission denied, another program holding HDF5's file lock,
                # an I/O error: the file may be fine, so it is not set aside.
                raise
            raise UnreadableCache(f"not a readable HDF5 file ({error})") from None
        except Exception as error:  # h5py raises ValueError, KeyError... on damaged files
            raise UnreadableCache(f"not a readable HDF5 file ({error})") from None
        try:
            self._check(identity)
            images = self._file["images"]
            self.keys = images["key"][()]
            self.size = images["size"][()]
            self.mtime_ns = images["mtime_ns"][()]
            self.sha256 = images["sha256"][()]
            self.folder = _folder_field(images, len(self.keys))
            self.rows = {key.decode(): row for row, key in enumerate(self.keys)}
            failed = self._file["failed"]
            self.failures = {
                key.decode(): Failure(path.decode(), int(size), int(mtime), reason.decode(),
                                      folder.decode())
                for key, path, size, mtime, reason, folder in zip(
                    *(failed[name][()] for name in _FAILED_FIELDS),
                    _folder_field(failed, len(failed["key"])),
                )
            }
        except Exception as error:
            self.close()
            if isinstance(error, UnreadableCache):
                raise
            raise UnreadableCache(f"damaged contents ({type(error).__name__}: {error})") from None

    def _check(self, identity):
        """Raises UnreadableCache unless the file is a plain cache of ``identity``.

        Made from metadata alone, before any dataset is read: the identity
        attributes, then every group and dataset ``__init__`` and ``blocks``
        read (``hdf5_checks``: hard links only, no external or virtual
        storage, the expected dtypes, sizes the file can hold), then equal
        row counts.
        """
        hdf5_checks.check_attributes(self._file, identity.attributes())
        found = {name: self._file.attrs.get(name) for name in identity.attributes()}
        found = {k: v.decode() if isinstance(v, bytes) else v for k, v in found.items()}
        if found != identity.attributes():
            raise UnreadableCache(f"built for {found}, expected {identity.attributes()}")
        types = {**_FIELD_TYPES, "bottleneck": (identity.dtype, 2)}
        for group_name, fields in (("images", _ROW_FIELDS), ("failed", _FAILED_FIELDS)):
            group = hdf5_checks.checked_group(self._file, group_name)
            expected = {name: types[name] for name in (*fields, *_OPTIONAL_FIELDS)}
            datasets = hdf5_checks.check_datasets(group, expected, self._size, self.path,
                                                  optional=_OPTIONAL_FIELDS)
            lengths = {dataset.shape[0] for dataset in datasets.values()}
            if len(lengths) != 1 or (group_name == "images" and datasets["bottleneck"].shape[1:]
                                     != (identity.feature_dim,)):
                raise UnreadableCache(f"datasets of unequal length or wrong width in {group_name}")

    def bottlenecks(self, rows):
        """float32 [len(rows), feature_dim] for the given row numbers, in order."""
        dataset = self._file["images/bottleneck"]
        rows = np.asarray(rows, dtype=np.int64)
        result = np.empty((len(rows), dataset.shape[1]), np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        start = 0
        # Contiguous slices of at most _BLOCK_ROWS: h5py point selections are
        # slow, and reading everything at once would need all of it in memory.
        while start < len(order):
            first = sorted_rows[start]
            stop = int(np.searchsorted(sorted_rows, first + _BLOCK_ROWS))
            block = dataset[first : sorted_rows[stop - 1] + 1]
            result[order[start:stop]] = block[sorted_rows[start:stop] - first]
            start = stop
        return result

    def blocks(self, keep):
        """The fields of the rows where ``keep`` (bool [rows]) is set, in blocks."""
        images = self._file["images"]
        for start in range(0, len(keep), _BLOCK_ROWS):
            mask = keep[start : start + _BLOCK_ROWS]
            if mask.any():
                block = {
                    name: images[name][start : start + len(mask)][mask]
                    for name in _ROW_FIELDS
                }
                block[_FOLDER] = self.folder[start : start + len(mask)][mask]
                yield block

    def close(self):
        self._file.close()


def _folder_field(group, count):
    """S16 [count]: the group's ``folder`` dataset, b"" (unknown) when absent."""
    if _FOLDER not in group:
        return np.zeros(count, "S16")
    if group[_FOLDER].shape != (count,):
        raise UnreadableCache("datasets of unequal length or wrong width")
    return group[_FOLDER][()]


def open_or_set_aside(path, identity):
    """The main cache file, or None when absent or set aside as unreadable.

    An unreadable file is renamed to ``<name>.corrupt-<UTC time>`` with one
    warning naming both paths, so the caller rebuilds it.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return CacheFile(path, identity)
    except UnreadableCache as error:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        os.replace(path, aside)
        logger.warning(
            "bottleneck cache %s cannot be used (%s); moved it to %s and rebuilding",
            path, error, aside,
        )
        return None


class Folded(typing.NamedTuple):
    """What ``fold`` did: ``merged`` shard files (deleted), and ``deferred``:
    None, or the one-line reason the merge was put off (too little free space)."""

    merged: int
    deferred: typing.Optional[str]


def fold(path, identity):
    """Merges the journal and every finished shard file into the main file.

    Also removes what killed runs left behind (temporary files, stale shard
    temporaries). The newest record of a key wins (journal files are newer
    than shard files); main rows it replaces are dropped. A shard file that
    cannot be used is renamed aside with a warning, never merged. When the
    new main file would not fit on the disk, nothing is written: the journal
    and shard files stay, are read beside the main file (``view.CacheView``)
    and are merged by a later fold with space.

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
    main = open_or_set_aside(path, identity)
    try:
        needed, free = _space(path, identity, main, winners, journal_keys)
        if needed > free:
            return Folded(0, f"merge deferred: needs {needed / 1e6:.1f} MB, {free / 1e6:.1f} "
                             f"MB free in {path.parent}; the journal keeps the new vectors")
        with atomic_write.atomic_path(path) as temporary:
            try:
                _write_main(temporary, identity, main, winners, journal_keys)
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
    sources = [_Source(file, _shard_loader(identity), True)
               for file in shards.finished(folder, Path(path).name)]
    journal = Journal(path, identity)
    return sources + [_Source(file, journal.load, False) for file in journal.files()]


def _shard_loader(identity):
    return lambda file: shards.load(file, identity)


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
        text += _text_bytes(main, main_keep)
        failures += sum(1 for key in main.failures if key.encode() not in journal_keys)
    needed = _estimate(identity, rows, text, failures)
    return needed, shutil.disk_usage(path.parent).free


def _text_bytes(main, keep):
    """The utf-8 length of the relative paths of the main rows where ``keep`` is set."""
    dataset = main._file["images/relative_path"]
    total = 0
    for start in range(0, len(keep), _BLOCK_ROWS):
        mask = keep[start : start + _BLOCK_ROWS]
        if mask.any():
            total += sum(len(text) for text in dataset[start : start + len(mask)][mask])
    return total


def _estimate(identity, rows, text_bytes, failures):
    """Bytes of a main file of ``rows`` rows and ``failures`` failures, at most
    1.5x what h5py writes (tests/test_cache_space.py measures it).

    Measured with h5py 3 / HDF5 1.14: bottlenecks take whole chunks; a row's
    fixed fields take 176 bytes (key 64, sha256 64, folder 16, size and
    mtime 8 each, the variable-length string's reference 16) and its path a
    global-heap object (16-byte header, data padded to 8 bytes); the file's
    own structures (superblock, object headers, chunk B-tree) about 10 kB.
    """
    chunks = -(-rows // _CHUNK_ROWS)
    vectors = chunks * _CHUNK_ROWS * identity.feature_dim * np.dtype(identity.dtype).itemsize
    # Rounded up (176 + 16 + 8 for the padding, plus slack for partly filled
    # heap collections): a run that waits for space costs more than 5%.
    per_row = 256
    # A failure: key, size, mtime, folder, two strings' references and heap
    # objects; its reason is a short sentence.
    per_failure = 256 + 512
    return vectors + rows * per_row + text_bytes * 11 // 10 + failures * per_failure + chunks * 64 + (64 << 10)


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
            arrays = source.load(source.file)
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
    index[_FOLDER] = folders(arrays)[rows]
    failed_folders = folders(arrays, "failed_")
    failures = {
        arrays["failed_key"][row].decode(): Failure(
            arrays["failed_relative_path"][row].decode(), int(arrays["failed_size"][row]),
            int(arrays["failed_mtime_ns"][row]), arrays["failed_reason"][row].decode(),
            failed_folders[row].decode(),
        )
        for row in kept[1]
    }
    text = sum(len(text) for text in arrays["relative_path"][rows])
    return Winner(source, rows, index, text, failures)


def _write_main(temporary, identity, main, winners, journal_keys):
    """Writes main rows not in the journal or shards, then their winners."""
    if main is None:
        main_keep, failures = np.zeros(0, bool), {}
    else:
        main_keep = ~np.isin(main.keys, np.array(sorted(journal_keys), dtype="S64"))
        failures = {
            k: f for k, f in main.failures.items() if k.encode() not in journal_keys
        }
    total = int(main_keep.sum()) + sum(len(winner.rows) for winner in winners)
    with h5py.File(temporary, "w") as out:
        out.attrs.update(identity.attributes())
        images = out.create_group("images")
        datasets = {
            name: images.create_dataset(name, (total,), dtype)
            for name, dtype in (
                ("key", "S64"), ("relative_path", _TEXT), ("size", np.int64),
                ("mtime_ns", np.int64), ("sha256", "S64"), (_FOLDER, "S16"),
            )
        }
        datasets["bottleneck"] = images.create_dataset(
            "bottleneck", (total, identity.feature_dim), identity.dtype,
            chunks=(_CHUNK_ROWS, identity.feature_dim), maxshape=(None, identity.feature_dim),
        )
        blocks = [] if main is None else main.blocks(main_keep)
        written = 0
        for block in blocks:
            written = _write_block(datasets, written, block)
        for winner in winners:
            arrays = winner.source.load(winner.source.file)
            block = {name: arrays[name][winner.rows] for name in _ROW_FIELDS}
            block[_FOLDER] = winner.index[_FOLDER]
            written = _write_block(datasets, written, block)
            failures.update(winner.failures)
        _write_failures(out.create_group("failed"), failures)


def _write_block(datasets, start, block):
    stop = start + len(block["key"])
    for name, values in block.items():
        if name == "relative_path":
            values = [v.decode() if isinstance(v, bytes) else v for v in values]
        datasets[name][start:stop] = values
    return stop


def _write_failures(group, failures):
    keys = sorted(failures)
    group.create_dataset("key", data=np.array([k.encode() for k in keys], dtype="S64"))
    group.create_dataset(
        "relative_path", data=[failures[k].relative_path for k in keys], dtype=_TEXT
    )
    group.create_dataset("size", data=np.array([failures[k].size for k in keys], np.int64))
    group.create_dataset(
        "mtime_ns", data=np.array([failures[k].mtime_ns for k in keys], np.int64)
    )
    group.create_dataset("reason", data=[failures[k].reason for k in keys], dtype=_TEXT)
    group.create_dataset(
        _FOLDER, data=np.array([failures[k].folder.encode() for k in keys], dtype="S16")
    )
