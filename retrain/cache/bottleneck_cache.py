"""BottleneckCache: extract what is missing or changed, read what is cached."""

import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import os
import sys
from pathlib import Path

import filelock
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from retrain import backbones, decode, extract
from retrain.cache import store
from retrain.cache.journal import Failure, Journal, Records
from retrain.config import check_setting
from retrain.errors import RetrainError

logger = logging.getLogger(__name__)

_TOUCHED_BATCH = 1024


@dataclasses.dataclass
class CacheReport:
    """What ``BottleneckCache.update`` did.

    ``extracted``: images run through the backbone; ``reused``: images whose
    cached vector was kept; ``failed``: (relative path, reason) of images that
    could not be read or decoded, with no vector; ``path``: the cache file.
    """

    extracted: int
    reused: int
    failed: list
    path: Path


@dataclasses.dataclass
class _Plan:
    reused: int = 0
    # (entry, row in the cache, new FileState): same content, new mtime.
    touched: list = dataclasses.field(default_factory=list)
    todo: list = dataclasses.field(default_factory=list)
    failed: list = dataclasses.field(default_factory=list)


class BottleneckCache:
    """The HDF5 bottleneck cache of one backbone in ``bottleneck_dir``.

    The file is ``<backbone>-<fingerprint[:16]>-<dtype>.h5``: another backbone,
    other weights or another storage dtype never share vectors. Rows are keyed
    by ``ImageEntry.key``; each records the file's size, mtime and sha256, so
    a replaced image is extracted again and a merely touched one is not.
    Images that fail to decode are remembered with their size and mtime and
    not decoded again until the file changes; they are reported on every run.

    Args:
      bottleneck_dir: folder of the cache files (created when needed).
      backbone_name: a key of ``backbones.names()``.
      weights_file: for Keras-application backbones, a local weights file.
      dtype: "float16" (half the disk) or "float32" storage; ``read`` always
        returns float32.
      lock_timeout: seconds to wait for another process using the same cache
        before raising RetrainError.
    """

    def __init__(self, bottleneck_dir, backbone_name, weights_file=None,
                 dtype="float16", lock_timeout=6 * 3600.0):
        check_setting("bottleneck_dtype", dtype, argument="dtype")
        self._spec = backbones.get(backbone_name)
        self._weights_file = weights_file
        fingerprint = backbones.fingerprint(self._spec.name, weights_file)
        self.identity = store.CacheIdentity(
            self._spec.name, fingerprint, self._spec.feature_dim, dtype
        )
        self.path = Path(bottleneck_dir) / f"{self._spec.name}-{fingerprint[:16]}-{dtype}.h5"
        self.lock_timeout = lock_timeout

    def update(self, image_list, batch_size=32, progress=True):
        """Extracts the bottlenecks of ``image_list`` that are missing or stale.

        Builds the backbone only if something must be extracted. Vectors are
        journalled batch by batch, so memory does not grow with the number of
        images and a killed run loses at most one batch. Bad images are
        warned about one line each and listed in ``CacheReport.failed``.

        Args:
          image_list: an ImageList from ``images.discover``.
          batch_size: int, images per backbone call.
          progress: show a progress bar (images/s, ETA) on stderr.

        Returns:
          CacheReport.
        """
        check_setting("extraction_batch_size", batch_size, argument="batch_size")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                plan, extracted, failed = self._update(image_list, batch_size, progress)
        except OSError as error:
            # Disk full, permissions, a file where the folder should be: the
            # user fixes the folder, so say which one instead of a traceback.
            raise _cache_error("write", self.path, error) from None
        failed = plan.failed + failed
        if failed:
            logger.warning("%d image(s) could not be read or decoded and were skipped",
                           len(failed))
        return CacheReport(
            extracted=extracted,
            reused=plan.reused + len(plan.touched),
            failed=sorted(failed),
            path=self.path,
        )

    def _update(self, image_list, batch_size, progress):
        """update() under the lock: (plan, extracted count, new failures)."""
        store.fold(self.path, self.identity)
        journal = Journal(self.path, self.identity)
        cache = store.open_or_set_aside(self.path, self.identity)
        try:
            plan = _plan(image_list, cache, progress)
            _journal_touched(plan.touched, cache, journal)
        finally:
            if cache is not None:
                cache.close()
        for relative_path, reason in plan.failed:
            logger.warning("skipped %s: %s", relative_path, reason)
        extracted, failed = self._extract(image_list, plan.todo, journal, batch_size, progress)
        store.fold(self.path, self.identity)
        return plan, extracted, failed

    def read(self, entries):
        """The cached bottlenecks of ``entries``, float32 [len(entries), feature_dim].

        Raises RetrainError if an entry is not in the cache (run ``update``
        first; images in ``CacheReport.failed`` have no vector).
        """
        if not self.path.exists():
            raise RetrainError(
                f"There is no bottleneck cache {self.path} yet; run "
                "BottleneckCache.update (or retrain --cache_only) first."
            )
        try:
            cache = store.CacheFile(self.path, self.identity)
        except OSError as error:
            raise _cache_error("read", self.path, error) from None
        except store.UnreadableCache as error:
            raise RetrainError(
                f"The bottleneck cache {self.path} cannot be read ({error}); "
                "run BottleneckCache.update (or retrain --cache_only) to build it."
            ) from None
        try:
            missing = [e.relative_path for e in entries if e.key not in cache.rows]
            if missing:
                raise RetrainError(
                    f"{len(missing)} of {len(entries)} images are not in the bottleneck "
                    f"cache {self.path}, e.g. {missing[0]}; run BottleneckCache.update "
                    "on their ImageList first and leave out CacheReport.failed."
                )
            return cache.bottlenecks([cache.rows[e.key] for e in entries])
        finally:
            cache.close()

    @contextlib.contextmanager
    def _locked(self):
        lock = filelock.FileLock(f"{self.path}.lock")
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            print(
                f"Another process is updating the bottleneck cache {self.path} "
                f"(lock {lock.lock_file}); waiting up to {self.lock_timeout:.0f} s.",
                file=sys.stderr,
            )
            try:
                lock.acquire(timeout=self.lock_timeout)
            except filelock.Timeout:
                raise RetrainError(
                    f"Gave up after {self.lock_timeout:.0f} s waiting for another process "
                    f"to release {lock.lock_file}; wait for it to finish, or use another "
                    f"bottleneck_dir. Received: lock_timeout={self.lock_timeout}"
                ) from None
        try:
            yield
        finally:
            lock.release()

    def _extract(self, image_list, todo, journal, batch_size, progress):
        """Runs the backbone over ``todo``; returns (extracted count, failures)."""
        if not todo:
            return 0, []
        model = backbones.load(self._spec.name, include_top=False,
                               weights_file=self._weights_file)
        paths = [image_list.image_dir / entry.relative_path for entry in todo]
        extracted, failed = 0, []
        with logging_redirect_tqdm(), tqdm(
            total=len(todo), desc="bottlenecks", unit="img", file=sys.stderr,
            disable=not progress, smoothing=0.1,
        ) as bar:
            for batch in extract.bottleneck_batches(paths, model, self._spec.input_size,
                                                    batch_size):
                records = Records()
                for position, state, vector in zip(batch.positions, batch.states,
                                                   batch.bottlenecks):
                    _add_row(records, todo[position], state, vector)
                for position, reason, state in batch.failures:
                    entry = todo[position]
                    failed.append((entry.relative_path, reason))
                    logger.warning("skipped %s: %s", entry.relative_path, reason)
                    if state is not None:
                        records.failures[entry.key] = Failure(
                            entry.relative_path, state.size, state.mtime_ns, reason
                        )
                journal.append(records)
                extracted += len(batch.positions)
                bar.update(len(batch))
        return extracted, failed


def _cache_error(action, path, error):
    """RetrainError for an OSError on the cache file or its folder."""
    if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        fix = "Another program has the file open (HDF5 file lock); close it or wait"
    else:
        fix = "Free space, fix the permissions or choose another folder"
    return RetrainError(
        f"Cannot {action} the bottleneck cache {path}: {error.strerror or error}. {fix}. "
        f"Received: bottleneck_dir={path.parent}"
    )


def _plan(image_list, cache, progress):
    """Sorts the entries into reused, touched, to extract and failed."""
    plan = _Plan()
    to_check = []
    for entry in image_list.entries:
        try:
            status = os.stat(image_list.image_dir / entry.relative_path)
        except OSError as error:
            plan.failed.append((entry.relative_path, f"cannot read: {error.strerror}"))
            continue
        stat = (status.st_size, status.st_mtime_ns)
        row = None if cache is None else cache.rows.get(entry.key)
        failure = None if cache is None else cache.failures.get(entry.key)
        if row is not None and (cache.size[row], cache.mtime_ns[row]) == stat:
            plan.reused += 1
        elif row is not None and cache.size[row] == stat[0]:
            to_check.append((entry, row))
        elif failure is not None and (failure.size, failure.mtime_ns) == stat:
            plan.failed.append((entry.relative_path, failure.reason))
        else:
            plan.todo.append(entry)
    if to_check:
        _check_digests(image_list.image_dir, to_check, cache, plan, progress)
    return plan


def _check_digests(image_dir, to_check, cache, plan, progress):
    """Same size, new mtime: the content digest decides (copies reset mtimes)."""
    paths = [image_dir / entry.relative_path for entry, _ in to_check]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        states = tqdm(pool.map(_state_or_none, paths), total=len(paths),
                      desc="checking changed files", unit="file", file=sys.stderr,
                      disable=not progress)
        for (entry, row), state in zip(to_check, states):
            if state is not None and state.sha256.encode() == cache.sha256[row]:
                plan.touched.append((entry, row, state))
            else:
                plan.todo.append(entry)


def _journal_touched(touched, cache, journal):
    """Journals the cached vectors of touched files under their new mtime."""
    for start in range(0, len(touched), _TOUCHED_BATCH):
        batch = touched[start : start + _TOUCHED_BATCH]
        vectors = cache.bottlenecks([row for _, row, _ in batch])
        records = Records()
        for (entry, _, state), vector in zip(batch, vectors):
            _add_row(records, entry, state, vector)
        journal.append(records)


def _state_or_none(path):
    try:
        return decode.file_state(path)
    except OSError:
        return None


def _add_row(records, entry, state, vector):
    records.key.append(entry.key)
    records.relative_path.append(entry.relative_path)
    records.size.append(state.size)
    records.mtime_ns.append(state.mtime_ns)
    records.sha256.append(state.sha256)
    records.bottleneck.append(np.asarray(vector))
