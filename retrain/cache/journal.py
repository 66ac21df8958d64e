"""The cache journal: finished batches, each in one small file, until folded.

Extraction appends each batch of records to ``<cache>.h5.journal/`` as one
``.npz`` (numbered, newest last), written with ``retrain.files.atomic_write``, so a journal file is whole or absent whatever kills the process.
``merge.fold`` merges the journal into the main file and then clears it.
"""

import dataclasses
import json
import math
import typing
import zipfile
from pathlib import Path

import numpy as np

from retrain.files import atomic_write

# 2: the file records the whole cache identity, not only the fingerprint.
FORMAT_VERSION = 2

# Touched files (same content, new mtime) re-journalled this many to a journal file.
TOUCHED_BATCH = 1024

# The per-row arrays of a journal or shard file ("failed_" + the Failure
# fields for failures). Files written before "folder" existed lack it:
# ``folders`` reads it as unknown.
ROW_NAMES = ("key", "relative_path", "size", "mtime_ns", "sha256", "folder", "bottleneck")


# Everything but the vectors: what deciding which records win needs.
INDEX_NAMES = tuple(n for n in ROW_NAMES if n != "bottleneck") + tuple(
    f"failed_{n}" for n in ("key", "relative_path", "size", "mtime_ns", "reason", "folder")
)


class UnreadableCache(Exception):
    """A cache or journal file that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """An image that could not be decoded, remembered until the file changes."""

    relative_path: str
    size: int
    mtime_ns: int
    reason: str
    # The image folder it was read from (plan.folder_id); "" when unknown
    # (records written before folders were recorded).
    folder: str = ""


@dataclasses.dataclass
class Records:
    """One batch of cache records: images with bottlenecks, and failures.

    The row fields are lists of equal length: str ``key``, ``relative_path``,
    ``sha256`` and ``folder`` (``plan.folder_id`` of the image folder), int
    ``size`` and ``mtime_ns``, and ``bottleneck`` one float array
    [feature_dim] per row. ``failures`` maps key -> Failure. Records built
    without ``folder`` (an empty list) are written with the folder unknown.
    """

    key: list = dataclasses.field(default_factory=list)
    relative_path: list = dataclasses.field(default_factory=list)
    size: list = dataclasses.field(default_factory=list)
    mtime_ns: list = dataclasses.field(default_factory=list)
    sha256: list = dataclasses.field(default_factory=list)
    bottleneck: list = dataclasses.field(default_factory=list)
    folder: list = dataclasses.field(default_factory=list)
    failures: dict = dataclasses.field(default_factory=dict)

    def __len__(self):
        return len(self.key) + len(self.failures)

    def add_row(self, key, relative_path, state, vector, folder):
        """Adds one image: its FileState (size, mtime_ns, sha256), bottleneck and folder id."""
        self.folder.append(folder)
        self.key.append(key)
        self.relative_path.append(relative_path)
        self.size.append(state.size)
        self.mtime_ns.append(state.mtime_ns)
        self.sha256.append(state.sha256)
        self.bottleneck.append(np.asarray(vector))

    def extend(self, other):
        """Appends the rows and failures of another Records."""
        for name in ROW_NAMES:
            getattr(self, name).extend(getattr(other, name))
        self.failures.update(other.failures)


def batch_records(batch, folder):
    """The Records of one ``engines.extraction.EntryBatch`` read from image ``folder``.

    Every vector becomes a row; a failure is remembered (until the file
    changes) only when it carries the file's state.
    """
    records = Records()
    for entry, state, vector in batch.vectors:
        records.add_row(entry.key, entry.relative_path, state, vector, folder)
    for entry, reason, state in batch.failures:
        if state is not None:
            records.failures[entry.key] = Failure(
                entry.relative_path, state.size, state.mtime_ns, reason, folder
            )
    return records


def journal_touched(touched, cache, sink, folder):
    """Writes the cached vectors of touched files, under their new mtime and
    image ``folder`` (``plan.folder_id``), to ``sink``."""
    for start in range(0, len(touched), TOUCHED_BATCH):
        batch = touched[start : start + TOUCHED_BATCH]
        vectors = cache.bottlenecks([row for _, row, _ in batch])
        records = Records()
        for (entry, _, state), vector in zip(batch, vectors):
            records.add_row(entry.key, entry.relative_path, state, vector, folder)
        sink.append(records)


def _text(value):
    # Names that are not valid UTF-8 (possible on Linux) are kept readable.
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class Journal:
    """The folder of not-yet-folded batches next to the main file."""

    def __init__(self, main_path, identity):
        self.folder = Path(f"{main_path}.journal")
        self.identity = identity
        self._next_number = None

    def files(self):
        """Complete journal files, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("[0-9]*.npz"))

    def append(self, records):
        """Writes one batch atomically (``retrain.files.atomic_write``)."""
        if not len(records):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._next_number is None:
            existing = self.files()
            self._next_number = int(existing[-1].stem) + 1 if existing else 1
        final = self.folder / f"{self._next_number:08d}.npz"
        arrays = to_arrays(records, self.identity)
        with atomic_write.atomic_path(final) as temporary:
            np.savez(temporary, **arrays)
        self._next_number += 1

    def load(self, path, names=None):
        """The arrays of one journal file (``names``: as for ``load_arrays``);
        UnreadableCache if damaged or foreign."""
        with open(path, "rb") as file:
            return load_arrays(file, self.identity, names)

    def clear(self):
        for path in self.folder.glob("*"):
            path.unlink()
        self.folder.rmdir()


def to_arrays(records, identity):
    """The arrays of one journal or shard file: ``records`` plus ``identity``."""
    failed = list(records.failures.items())
    return {
        "format_version": np.array(FORMAT_VERSION),
        "identity": np.array(json.dumps(identity.attributes(), sort_keys=True).encode()),
        "key": np.array([k.encode() for k in records.key], dtype="S64"),
        "relative_path": _bytes(records.relative_path),
        "size": np.array(records.size, dtype=np.int64),
        "mtime_ns": np.array(records.mtime_ns, dtype=np.int64),
        "sha256": np.array([d.encode() for d in records.sha256], dtype="S64"),
        "folder": np.array(
            [f.encode() for f in records.folder or [""] * len(records.key)], dtype="S16"
        ),
        "bottleneck": np.asarray(records.bottleneck, dtype=identity.dtype).reshape(
            len(records.key), identity.feature_dim
        ),
        "failed_key": np.array([k.encode() for k, _ in failed], dtype="S64"),
        "failed_relative_path": _bytes(f.relative_path for _, f in failed),
        "failed_size": np.array([f.size for _, f in failed], dtype=np.int64),
        "failed_mtime_ns": np.array([f.mtime_ns for _, f in failed], dtype=np.int64),
        "failed_reason": _bytes(f.reason for _, f in failed),
        "failed_folder": np.array([f.folder.encode() for _, f in failed], dtype="S16"),
    }


def folders(arrays, prefix=""):
    """S16 [rows]: the ``folder`` (or ``failed_folder``) array of a journal or
    shard file's arrays, b"" (unknown) for each row of a file written before
    folders were recorded."""
    found = arrays.get(f"{prefix}folder")
    return np.zeros(len(arrays[f"{prefix}key"]), "S16") if found is None else found


def load_arrays(file, identity, names=None):
    """The arrays of a journal or shard file (an open binary file).

    ``names``: the arrays to read (all when None; a name the file lacks is
    left out, as when None); the identity is always checked. Every member's ``.npy`` header and declared size are checked
    (``_checked_members``) before any array is read, so a small file cannot
    expand into gigabytes and no member is unpickled. Raises UnreadableCache
    when the file is damaged, oversized or was written for another cache
    identity (other backbone, weights, dtype or settings); an OSError with an
    errno (permission, I/O) is not about the content and propagates.
    """
    try:
        with zipfile.ZipFile(file) as archive:
            members = _checked_members(archive, identity)

            def read(name):
                return _read_member(archive, members[name])

            if int(read("format_version")) != FORMAT_VERSION:
                raise UnreadableCache("written for another cache format")
            found = json.loads(read("identity").item().decode())
            if found != json.loads(json.dumps(identity.attributes())):
                raise UnreadableCache(f"built for {found}, expected {identity.attributes()}")
            return {name: read(name) for name in (names or members) if name in members}
    except UnreadableCache:
        raise
    except OSError as error:
        if error.errno is not None:
            raise
        raise UnreadableCache(f"{type(error).__name__}: {error}") from None
    except Exception as error:
        raise UnreadableCache(f"{type(error).__name__}: {error}") from None


# A journal or shard file holds at most a few thousand rows (about 2.6 KB
# each in float16); a file declaring more than this is refused unread.
MAX_FILE_BYTES = 1 << 30
_MAX_MEMBERS = 64
_MAX_SCALAR_BYTES = 1 << 16
_NPY_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _member_layout(identity):
    """{array name: (dtype, or "S" for bytes of any length, shape)}; the shape
    names its row counts "rows" and "failed"."""
    rows, failed = ("rows",), ("failed",)
    int64, digest, folder = np.dtype(np.int64), np.dtype("S64"), np.dtype("S16")
    return {
        "format_version": (int64, ()),
        "identity": ("S", ()),
        "key": (digest, rows),
        "relative_path": ("S", rows),
        "size": (int64, rows),
        "mtime_ns": (int64, rows),
        "sha256": (digest, rows),
        "folder": (folder, rows),
        "bottleneck": (np.dtype(identity.dtype), ("rows", identity.feature_dim)),
        "failed_key": (digest, failed),
        "failed_relative_path": ("S", failed),
        "failed_size": (int64, failed),
        "failed_mtime_ns": (int64, failed),
        "failed_reason": ("S", failed),
        "failed_folder": (folder, failed),
    }


class _Member(typing.NamedTuple):
    """One checked ``.npy`` member: its ZipInfo, and the header already parsed."""

    info: zipfile.ZipInfo
    shape: tuple
    fortran_order: bool
    dtype: np.dtype
    header_bytes: int


def _checked_members(archive, identity):
    """{array name: _Member} of an npz archive whose every member checks out.

    From the zip directory and each member's ``.npy`` header only: at most
    MAX_FILE_BYTES declared in all; each member exactly its header plus
    shape x itemsize; the dtype and shape ``_member_layout`` expects (members
    it does not know: any plain dtype), one row count per kind of row.
    Raises UnreadableCache.
    """
    infos = archive.infolist()
    if len(infos) > _MAX_MEMBERS:
        raise UnreadableCache(f"{len(infos)} members, expected at most {_MAX_MEMBERS}")
    declared = sum(info.file_size for info in infos)
    if declared > MAX_FILE_BYTES:
        raise UnreadableCache(
            f"members declare {declared} bytes uncompressed, more than the "
            f"{MAX_FILE_BYTES} a journal or shard file may hold"
        )
    layout, counts, members = _member_layout(identity), {}, {}
    for info in infos:
        name = info.filename.removesuffix(".npy")
        member = _member_header(archive, info)
        shape, dtype = member.shape, member.dtype
        want_dtype, want_shape = layout.get(name, (None, None))
        if want_dtype is not None and (
            dtype.kind != "S" if want_dtype == "S" else dtype != want_dtype
        ):
            raise UnreadableCache(f"{info.filename} holds {dtype}, expected {want_dtype}")
        if want_shape is not None:
            if len(shape) != len(want_shape):
                raise UnreadableCache(f"{info.filename} has shape {shape}")
            for size, want in zip(shape, want_shape):
                # A number is a fixed width; a name, a row count all its arrays share.
                expected = want if isinstance(want, int) else counts.setdefault(want, size)
                if size != expected:
                    raise UnreadableCache(
                        f"{info.filename} has shape {shape}, expected {expected} in place of {size}"
                    )
        if shape == () and dtype.itemsize > _MAX_SCALAR_BYTES:
            raise UnreadableCache(f"{info.filename} holds {dtype.itemsize} bytes")
        members[name] = member
    return members


def _member_header(archive, info):
    """The _Member of one ``.npy`` member, read from its header alone."""
    with archive.open(info) as stream:
        reader = _NPY_READERS.get(np.lib.format.read_magic(stream))
        if reader is None:
            raise UnreadableCache(f"{info.filename} is not a .npy array of a known version")
        shape, fortran_order, dtype = reader(stream)
        header_bytes = stream.tell()
    if dtype.hasobject:
        raise UnreadableCache(f"{info.filename} holds Python objects")
    if info.file_size != header_bytes + math.prod(shape) * dtype.itemsize:
        raise UnreadableCache(
            f"{info.filename} declares {info.file_size} bytes, its header {shape} x {dtype}"
        )
    return _Member(info, shape, fortran_order, dtype, header_bytes)


def _read_member(archive, member):
    """The array of a checked member, its header not parsed again (a fold
    reads every journal file: numpy's header parsing was a third of it)."""
    shape = member.shape[::-1] if member.fortran_order else member.shape
    array = np.empty(shape, member.dtype)
    with archive.open(member.info) as stream:
        stream.read(member.header_bytes)
        if stream.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
            raise UnreadableCache(f"{member.info.filename} is shorter than its header says")
    return array.T if member.fortran_order else array


def _bytes(texts):
    return np.array([_text(t).encode("utf-8") for t in texts], dtype=bytes)
