"""The plan: which images of an ImageList need extraction, and which do not."""

import concurrent.futures
import dataclasses
import os
import sys

from tqdm import tqdm

from retrain import decode, paths


@dataclasses.dataclass
class Plan:
    """Where each image stands against the cache and its finished shards.

    ``reused``: int, images whose cached vector is current; ``sharded``: int,
    images recorded (vector or failure) in a finished shard file, current,
    not merged yet; ``touched``: (entry, cache row, FileState) of files with
    the same content but a new mtime (their vector is kept); ``todo``: the
    entries to extract; ``failed``: (relative path, reason) of images that
    cannot be read or that failed to decode before and have not changed.
    """

    reused: int = 0
    sharded: int = 0
    touched: list = dataclasses.field(default_factory=list)
    todo: list = dataclasses.field(default_factory=list)
    failed: list = dataclasses.field(default_factory=list)


def plan(image_dir, entries, cache, recorded=None, progress=True):
    """Sorts ``entries`` into reused, sharded, touched, to extract and failed.

    Args:
      image_dir: the folder the entries are relative to.
      entries: list of images.ImageEntry.
      cache: the main store.CacheFile, or None when there is none.
      recorded: {key: (size, mtime_ns)} of finished shard records, or None.
      progress: show a progress bar while digesting files whose mtime changed.
    """
    result = Plan()
    recorded = recorded or {}
    to_check = []
    for entry in entries:
        try:
            stat = paths.stat(paths.join(image_dir, entry.relative_path))
        except OSError as error:
            result.failed.append((entry.relative_path, f"cannot read: {error.strerror}"))
            continue
        row = None if cache is None else cache.rows.get(entry.key)
        failure = None if cache is None else cache.failures.get(entry.key)
        if recorded.get(entry.key) == stat:
            result.sharded += 1
        elif row is not None and (cache.size[row], cache.mtime_ns[row]) == stat:
            result.reused += 1
        elif row is not None and cache.size[row] == stat[0]:
            to_check.append((entry, row))
        elif failure is not None and (failure.size, failure.mtime_ns) == stat:
            result.failed.append((entry.relative_path, failure.reason))
        else:
            result.todo.append(entry)
    if to_check:
        _check_digests(image_dir, to_check, cache, result, progress)
    return result


def _check_digests(image_dir, to_check, cache, result, progress):
    """Same size, new mtime: the content digest decides (copies reset mtimes)."""
    files = [paths.join(image_dir, entry.relative_path) for entry, _ in to_check]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        states = tqdm(pool.map(_state_or_none, files), total=len(files),
                      desc="checking changed files", unit="file", file=sys.stderr,
                      disable=not progress)
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
