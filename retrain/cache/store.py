"""The main cache file: reading it (``CacheFile``), setting a bad one aside, writing a new one.

A SIGKILL or a power cut in the middle of an HDF5 write can leave a file that
no longer opens, so the main file ``<name>.h5`` is never written in place:

* extraction appends each finished batch to the journal folder
  ``<name>.h5.journal/`` as one small ``.npz`` file, written to a temporary
  name, fsynced and renamed (a journal file is whole or absent);
* ``merge.fold`` writes the main rows plus the journal into a temporary file beside
  ``<name>.h5`` and renames it over the main file (``retrain.files.atomic_write``),
  and only then deletes the journal.

Shard files (``shards``), written beside the main file by other processes,
are merged by ``merge.fold`` the same way and deleted after the rename.

A kill at any instant leaves the old main file or the new one, plus journal
and shard files that the next ``fold`` merges again; a key is stored once, the newest
record winning, so nothing is duplicated. Callers hold the cache lock.

Layout of the main file (``identity.FORMAT_VERSION`` 1), one row per image:
``images/key`` S64 (sha256 hex of the relative path), ``images/relative_path``
(utf-8), ``images/size`` and ``images/mtime_ns`` int64, ``images/sha256`` S64
(content digest), ``images/folder`` S16 (``plan.folder_id`` of the image
folder the row was extracted from; absent in files written before it
existed, read as b"" = unknown), ``images/bottleneck`` [rows, feature_dim]
in the cache dtype; ``failed/*`` the same for images that could not be
decoded, with ``reason`` instead of digest and bottleneck. File attributes hold the backbone name,
fingerprint, feature_dim, dtype and format version, checked on every open;
outside the identity, ``RATE`` records the measured extraction speed.
"""

import datetime
import logging
import math
import os
from pathlib import Path

import h5py
import numpy as np

from retrain.cache import hdf5_checks
from retrain.cache.journal import Failure, UnreadableCache

logger = logging.getLogger(__name__)

_BLOCK_ROWS = 4096
CHUNK_ROWS = 256
_TEXT = h5py.string_dtype("utf-8")
_ROW_FIELDS = ("key", "relative_path", "size", "mtime_ns", "sha256", "bottleneck")
_FAILED_FIELDS = ("key", "relative_path", "size", "mtime_ns", "reason")
# Optional in both groups: files written before it existed lack it.
FOLDER = "folder"
# What each dataset of ``images`` and ``failed`` must hold, checked before it
# is read (``hdf5_checks``): dtype (or text) and number of dimensions; the
# bottleneck's dtype is the identity's. The optional ones may be absent (files
# written before they existed).
_FIELD_TYPES = {
    "key": ("S64", 1),
    "relative_path": (hdf5_checks.TEXT, 1),
    "size": (np.int64, 1),
    "mtime_ns": (np.int64, 1),
    "sha256": ("S64", 1),
    "reason": (hdf5_checks.TEXT, 1),
    "folder": ("S16", 1),
}
_OPTIONAL_FIELDS = ("folder",)
# File attribute: images/s (float) of the last extraction into the file that
# measured one, kept by every merge; what `--preset best`'s cost estimate
# scales (retrain.presets). Not part of the identity: a file without it, or
# with a value that is not a positive number, is used as ever.
RATE = "extraction_images_per_second"
# A run extracting fewer images measured mostly the engine's first calls: it
# records its speed only in a file that holds none.
RATED_IMAGES = 64


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
            self.images_per_second = _recorded_rate(self._file)
            images = self._file["images"]
            self.keys = images["key"][()]
            self.size = images["size"][()]
            self.mtime_ns = images["mtime_ns"][()]
            self.sha256 = images["sha256"][()]
            self.folder = _folder_field(images, len(self.keys))
            self.rows = {key.decode(): row for row, key in enumerate(self.keys)}
            failed = self._file["failed"]
            self.failures = {
                key.decode(): Failure(
                    path.decode(), int(size), int(mtime), reason.decode(), folder.decode()
                )
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
            datasets = hdf5_checks.check_datasets(
                group, expected, self._size, self.path, optional=_OPTIONAL_FIELDS
            )
            lengths = {dataset.shape[0] for dataset in datasets.values()}
            if len(lengths) != 1 or (
                group_name == "images"
                and datasets["bottleneck"].shape[1:] != (identity.feature_dim,)
            ):
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
                    name: images[name][start : start + len(mask)][mask] for name in _ROW_FIELDS
                }
                block[FOLDER] = self.folder[start : start + len(mask)][mask]
                yield block

    def text_bytes(self, keep):
        """The utf-8 length of the relative paths of the rows where ``keep`` (bool [rows]) is set."""
        dataset = self._file["images/relative_path"]
        total = 0
        for start in range(0, len(keep), _BLOCK_ROWS):
            mask = keep[start : start + _BLOCK_ROWS]
            if mask.any():
                total += sum(len(text) for text in dataset[start : start + len(mask)][mask])
        return total

    def close(self):
        self._file.close()


def _folder_field(group, count):
    """S16 [count]: the group's ``folder`` dataset, b"" (unknown) when absent."""
    if FOLDER not in group:
        return np.zeros(count, "S16")
    if group[FOLDER].shape != (count,):
        raise UnreadableCache("datasets of unequal length or wrong width")
    return group[FOLDER][()]


def _recorded_rate(file):
    """The file's RATE attribute: a positive finite float, else None."""
    try:
        hdf5_checks.check_attributes(file, (RATE,))
        value = float(file.attrs.get(RATE, 0.0))
    except Exception:  # noqa: BLE001 - an odd value is no speed, never a reason to set the file aside
        return None
    return value if 0 < value < math.inf else None


def recorded_rate(path):
    """The extraction images/s recorded in the main file ``path``; None when absent or unreadable."""
    try:
        hdf5_checks.check_regular_file(path)
        with h5py.File(path, "r") as file:
            return _recorded_rate(file)
    except Exception:  # noqa: BLE001 - h5py raises anything on damaged files; update sets them aside
        return None


def rate_to_record(path, extracted, seconds):
    """images/s of ``extracted`` images in ``seconds`` to record in the main file ``path``.

    None (keep what the file holds) when nothing was extracted, or fewer
    than RATED_IMAGES into a file that already records a speed.
    """
    if not extracted or seconds <= 0:
        return None
    if extracted < RATED_IMAGES and recorded_rate(path) is not None:
        return None
    return extracted / seconds


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
            path,
            error,
            aside,
        )
        return None


def write_main(temporary, identity, main, winners, journal_keys, images_per_second=None):
    """Writes main rows not in the journal or shards, then their winners.

    RATE is ``images_per_second`` when given, else the main file's.
    """
    if main is None:
        main_keep, failures = np.zeros(0, bool), {}
    else:
        main_keep = ~np.isin(main.keys, np.array(sorted(journal_keys), dtype="S64"))
        failures = {k: f for k, f in main.failures.items() if k.encode() not in journal_keys}
    total = int(main_keep.sum()) + sum(len(winner.rows) for winner in winners)
    with h5py.File(temporary, "w") as out:
        out.attrs.update(identity.attributes())
        rate = images_per_second or (main.images_per_second if main is not None else None)
        if rate:
            out.attrs[RATE] = float(rate)
        images = out.create_group("images")
        datasets = {
            name: images.create_dataset(name, (total,), dtype)
            for name, dtype in (
                ("key", "S64"),
                ("relative_path", _TEXT),
                ("size", np.int64),
                ("mtime_ns", np.int64),
                ("sha256", "S64"),
                (FOLDER, "S16"),
            )
        }
        datasets["bottleneck"] = images.create_dataset(
            "bottleneck",
            (total, identity.feature_dim),
            identity.dtype,
            chunks=(CHUNK_ROWS, identity.feature_dim),
            maxshape=(None, identity.feature_dim),
        )
        blocks = [] if main is None else main.blocks(main_keep)
        written = 0
        for block in blocks:
            written = _write_block(datasets, written, block)
        for block in _winner_blocks(winners):
            written = _write_block(datasets, written, block)
        for winner in winners:
            failures.update(winner.failures)
        _write_failures(out.create_group("failed"), failures)


def _winner_blocks(winners):
    """The winners' rows (``_ROW_FIELDS`` and FOLDER arrays), read file by file
    and handed on in blocks of at least CHUNK_ROWS rows: a journal file holds
    one extraction batch, and an h5py write per field and batch cost more
    than the data."""
    parts, rows = [], 0
    for winner in winners:
        arrays = winner.source.load(winner.source.file, _ROW_FIELDS)
        part = {name: arrays[name][winner.rows] for name in _ROW_FIELDS}
        part[FOLDER] = winner.index[FOLDER]
        parts.append(part)
        rows += len(winner.rows)
        if rows >= CHUNK_ROWS:
            yield _joined(parts)
            parts, rows = [], 0
    if parts:
        yield _joined(parts)


def _joined(parts):
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


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
    group.create_dataset("mtime_ns", data=np.array([failures[k].mtime_ns for k in keys], np.int64))
    group.create_dataset("reason", data=[failures[k].reason for k in keys], dtype=_TEXT)
    group.create_dataset(
        FOLDER, data=np.array([failures[k].folder.encode() for k in keys], dtype="S16")
    )
