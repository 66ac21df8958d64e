"""Checks on a cache HDF5 file made before any of its data is read.

A cache folder may hold a file someone else planted or a run of another
program damaged. HDF5 can make a read fetch bytes from *other* files: a
dataset's raw data can live in external files (``external=[...]``), a
virtual dataset maps other files' datasets, and external links open other
files when traversed; soft links redirect to other objects. Reading such a
file would copy another file's bytes into the cache. A declared shape can
also be absurd (a 64 TB dataset of a small file, filled with the fill value)
and variable-length strings can all point at one large heap object. So every
group and dataset the cache reads is checked first, from metadata only:

* a hard link (no soft or external link), to a group or dataset as expected;
* a dataset with plain storage: no external storage, not virtual, no filters
  (retrain never writes compressed or filtered datasets);
* the expected dtype and number of dimensions;
* a size the file can hold: a fixed-size dataset has at most as many bytes as
  the file; the strings of a variable-length text dataset add up to at most
  the file's size (their lengths are read from the dataset's raw records).

Anything else raises ``UnreadableCache``, so the caller sets the file aside
and rebuilds it.
"""

import os
import stat

import h5py
import numpy as np

from retrain.cache.journal import UnreadableCache

# How HDF5 stores one variable-length element in a dataset's raw data: the
# sequence length, then the global heap ID (collection address, object index),
# little-endian, with the 8-byte addresses h5py's files use.
_VLEN_RECORD = np.dtype([("length", "<u4"), ("address", "<u8"), ("index", "<u4")])
# What an expected dataset holds: "text" (variable-length UTF-8 strings) or a
# numpy dtype.
TEXT = "text"


def check_regular_file(path):
    """Raises UnreadableCache unless ``path`` is a regular file (not a link).

    A FIFO would block the open forever; a symbolic link would read whatever
    file it points at. Returns the file's size in bytes.
    """
    status = os.stat(path, follow_symlinks=False)
    if stat.S_ISLNK(status.st_mode):
        raise UnreadableCache("it is a symbolic link, not a cache file")
    if not stat.S_ISREG(status.st_mode):
        raise UnreadableCache("it is not a regular file")
    return status.st_size


def check_attributes(node, names):
    """Raises UnreadableCache unless each present attribute of ``names`` is a scalar.

    Reading an attribute then reads one value, never an array of any size.
    """
    for name in names:
        if name in node.attrs and node.attrs.get_id(name).shape not in ((), None):
            raise UnreadableCache(f"attribute {name!r} is not a single value")


def checked_group(parent, name):
    """``parent[name]``, a group reached by a hard link; else UnreadableCache."""
    _check_hard_link(parent, name)
    group = parent[name]
    if not isinstance(group, h5py.Group):
        raise UnreadableCache(f"{group.name} is not a group")
    return group


def check_datasets(group, expected, file_size, path, optional=()):
    """Checks the datasets of ``group`` named in ``expected`` before any is read.

    Args:
      group: an open h5py.Group (itself already checked).
      expected: {name: (TEXT or numpy dtype, number of dimensions)}.
      file_size: int, bytes of the file (no dataset may be larger).
      path: the file's path (variable-length records are read from it).
      optional: names of ``expected`` that may be absent.

    Returns:
      {name: h5py.Dataset} of those present.

    Raises:
      UnreadableCache naming the dataset and what is wrong with it.
    """
    datasets = {}
    for name, (kind, ndim) in expected.items():
        # Looked up as a link: ``name in group`` would follow an external link.
        if name in optional and group.get(name, getlink=True) is None:
            continue
        _check_hard_link(group, name)
        dataset = group[name]
        if not isinstance(dataset, h5py.Dataset):
            raise UnreadableCache(f"{group.name}/{name} is not a dataset")
        _check_storage(dataset)
        if dataset.ndim != ndim:
            raise UnreadableCache(f"{dataset.name} has {dataset.ndim} dimensions, not {ndim}")
        if kind == TEXT:
            _check_text(dataset, file_size, path)
        else:
            if dataset.dtype != np.dtype(kind):
                raise UnreadableCache(f"{dataset.name} holds {dataset.dtype}, not {np.dtype(kind)}")
            if dataset.nbytes > file_size:
                raise UnreadableCache(
                    f"{dataset.name} declares {dataset.nbytes} bytes in a file of {file_size}"
                )
        datasets[name] = dataset
    return datasets


def _check_hard_link(group, name):
    link = group.get(name, getlink=True)
    if link is None:
        raise UnreadableCache(f"{group.name.rstrip('/')}/{name} is missing")
    if not isinstance(link, h5py.HardLink):
        # Only the link is looked at: following it would open the other file.
        raise UnreadableCache(
            f"{group.name.rstrip('/')}/{name} is a {type(link).__name__}, "
            "not a plain dataset or group"
        )


def _check_storage(dataset):
    if dataset.is_virtual:
        raise UnreadableCache(f"{dataset.name} is a virtual dataset (data in other files)")
    create = dataset.id.get_create_plist()
    if create.get_external_count():
        raise UnreadableCache(f"{dataset.name} keeps its data in external files")
    if create.get_nfilters():
        raise UnreadableCache(
            f"{dataset.name} uses HDF5 filters (compression), which retrain never writes"
        )


def _check_text(dataset, file_size, path):
    """Variable-length UTF-8 strings whose recorded lengths add up to <= file_size."""
    info = h5py.check_string_dtype(dataset.dtype)
    if info is None or info.length is not None:
        raise UnreadableCache(f"{dataset.name} holds {dataset.dtype}, not variable-length text")
    # HDF5 allocates each string at its recorded length before reading it, so
    # the recorded lengths bound what reading the dataset takes; many records
    # pointing at one large heap object would otherwise multiply it.
    total = sum(
        int(
            np.fromfile(path, _VLEN_RECORD, count=count, offset=offset)["length"].sum(
                dtype=np.uint64
            )
        )
        for offset, count in _raw_extents(dataset, file_size)
    )
    if total > file_size:
        raise UnreadableCache(
            f"{dataset.name} declares {total} bytes of text in a file of {file_size}"
        )


def _raw_extents(dataset, file_size):
    """[(file offset, number of records)] of a text dataset's raw data.

    Contiguous storage is one extent; chunked storage (unfiltered, checked
    before) one per allocated chunk, of whole chunks.
    """
    size = _VLEN_RECORD.itemsize
    if dataset.chunks is None:
        rows = int(np.prod(dataset.shape))
        offset = dataset.id.get_offset()
        extents = [] if rows == 0 or offset is None else [(offset, rows)]
        if dataset.id.get_storage_size() != rows * size * bool(extents):
            raise UnreadableCache(f"{dataset.name} is not stored as retrain writes text")
    else:
        count = int(np.prod(dataset.chunks))
        chunks = [dataset.id.get_chunk_info(i) for i in range(dataset.id.get_num_chunks())]
        if any(chunk.size != count * size for chunk in chunks):
            raise UnreadableCache(f"{dataset.name} is not stored as retrain writes text")
        extents = [(chunk.byte_offset, count) for chunk in chunks]
    if any(offset + count * size > file_size for offset, count in extents):
        raise UnreadableCache(f"{dataset.name} points outside the file")
    return extents
