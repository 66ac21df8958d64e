"""The plan: which images of an ImageList need extraction, and which do not."""

import concurrent.futures
import dataclasses
import hashlib
import os
import sys

from tqdm import tqdm

from retrain.data import decode
from retrain.files import paths


@dataclasses.dataclass
class Plan:
    """Where each image stands against the cache and its finished shards.

    ``reused``: int, images whose cached vector is current; ``sharded``: int,
    images recorded (vector or failure) in a finished shard file, current,
    not merged yet; ``touched``: (entry, cache row, FileState) of files with
    the same content but a new mtime or folder (their vector is kept); ``todo``: the
    entries to extract; ``failed``: (relative path, reason) of images that
    cannot be read or that failed to decode before and have not changed.
    """

    reused: int = 0
    sharded: int = 0
    touched: list = dataclasses.field(default_factory=list)
    todo: list = dataclasses.field(default_factory=list)
    failed: list = dataclasses.field(default_factory=list)


def folder_id(image_dir):
    """str, 16 hex digits naming an image folder: its real path (symlinks
    resolved) for a local folder, the URL itself for ``gs://...``.

    Two folders sharing a cache may hold different pictures under one
    relative path with equal size and mtime; a row is reused on (size, mtime)
    only for the folder that recorded it, elsewhere the content digest decides.
    """
    name = str(image_dir).rstrip("/") if paths.is_url(image_dir) else os.path.realpath(image_dir)
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def plan(image_dir, entries, cache, progress=True):
    """Sorts ``entries`` into reused, sharded, touched, to extract and failed.

    A row is current when its size, mtime and image folder match the file;
    with the same size but another mtime or folder (or a row written before
    folders were recorded), the content digest decides.

    Args:
      image_dir: the folder the entries are relative to.
      entries: list of images.ImageEntry.
      cache: a view.CacheView (main file plus unmerged records), or None.
      progress: show a progress bar while digesting files whose mtime changed.
    """
    result = Plan()
    folder = folder_id(image_dir).encode()
    to_check = []
    for entry in entries:
        try:
            stat = paths.stat(paths.join(image_dir, entry.relative_path))
        except OSError as error:
            result.failed.append((entry.relative_path, f"cannot read: {error.strerror}"))
            continue
        row = None if cache is None else cache.rows.get(entry.key)
        failure = None if cache is None else cache.failures.get(entry.key)
        if row is not None and cache.size[row] == stat[0]:
            if (cache.mtime_ns[row], cache.folder[row]) == (stat[1], folder):
                _count_current(result, entry, cache)
            else:
                to_check.append((entry, row))
        elif failure is not None and (failure.size, failure.mtime_ns, failure.folder.encode()) == (
            *stat,
            folder,
        ):
            if entry.key in cache.shard_keys:
                result.sharded += 1
            else:
                result.failed.append((entry.relative_path, failure.reason))
        else:
            result.todo.append(entry)
    if to_check:
        _check_digests(image_dir, to_check, cache, result, progress)
    return result


def _count_current(result, entry, cache):
    if entry.key in cache.shard_keys:
        result.sharded += 1
    else:
        result.reused += 1


def _check_digests(image_dir, to_check, cache, result, progress):
    """Same size, new mtime or folder: the content digest decides (copies reset
    mtimes; a moved or copied image folder keeps its vectors)."""
    files = [paths.join(image_dir, entry.relative_path) for entry, _ in to_check]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        states = tqdm(
            pool.map(_state_or_none, files),
            total=len(files),
            desc="checking changed files",
            unit="file",
            file=sys.stderr,
            disable=not progress,
        )
        for (entry, row), state in zip(to_check, states):
            if state is not None and state.sha256.encode() == cache.sha256[row]:
                result.touched.append((entry, row, state))
            else:
                result.todo.append(entry)


def _state_or_none(path):
    try:
        return decode.file_state(path)
    except OSError:
        return None
