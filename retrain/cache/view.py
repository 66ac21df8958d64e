"""The cache as a run sees it: the main file plus the records not merged yet.

Finished shard files and the journal normally last only until the next
``merge.fold``. When the disk cannot hold the merged file, the fold is
deferred and they stay; a run still plans and trains on every row, reading
them beside the main file through this view (the newest record of a key
winning, as the merge would decide).
"""

import numpy as np

from retrain.cache import merge


class CacheView:
    """The index of ``store.CacheFile`` over the main file and unmerged records.

    ``rows`` {str key: row}, ``size`` and ``mtime_ns`` int64 [rows],
    ``sha256`` S64 [rows], ``folder`` S16 [rows] and ``failures`` {str key:
    Failure}, as the merge would write them; ``shard_keys``: the keys whose
    record is in a shard file (``plan`` counts them as sharded). Rows below
    the main file's length are its rows; the rest are unmerged records, whose
    vectors are read into memory (at most the unmerged part, in the cache's
    dtype) the first time one is asked for.

    Args:
      main: an open store.CacheFile (closed by ``close``), or None.
      winners: ``merge.newest_records`` of the unmerged files (list of merge.Winner).
      pending_keys: the keys (bytes) those files hold.
    """

    def __init__(self, main, winners, pending_keys):
        self._main = main
        self._winners = winners
        self._vectors = None
        self.shard_keys = set()
        if main is None:
            self.rows, self.failures = {}, {}
            base = {name: np.zeros(0, dtype) for name, dtype in _INDEX}
        else:
            self.rows, self.failures = main.rows, main.failures
            base = {name: getattr(main, field) for name, field in _FIELDS}
        self._main_rows = len(base["key"])
        for key in pending_keys:
            # A newer record replaces the main file's row or failure.
            self.rows.pop(key.decode(), None)
            self.failures.pop(key.decode(), None)
        parts = [base] + [winner.index for winner in winners]
        for name, _ in _INDEX:
            values = [part[name] for part in parts]
            setattr(
                self,
                "keys" if name == "key" else name,
                np.concatenate(values) if len(values) > 1 else values[0],
            )
        row = self._main_rows
        for winner in winners:
            keys = [key.decode() for key in winner.index["key"]]
            self.rows.update(zip(keys, range(row, row + len(keys))))
            self.failures.update(winner.failures)
            if winner.source.shard:
                self.shard_keys.update(keys, winner.failures)
            row += len(keys)

    @property
    def pending(self):
        """int, the unmerged records (rows and failures) this view reads."""
        return sum(len(w.rows) + len(w.failures) for w in self._winners)

    def bottlenecks(self, rows):
        """float32 [len(rows), feature_dim] for the given row numbers, in order."""
        rows = np.asarray(rows, dtype=np.int64)
        in_main = rows < self._main_rows
        if self._main is not None and in_main.all():
            return self._main.bottlenecks(rows)
        pending = self.load_pending()
        result = np.empty((len(rows), pending.shape[1]), np.float32)
        if in_main.any():
            result[in_main] = self._main.bottlenecks(rows[in_main])
        result[~in_main] = pending[rows[~in_main] - self._main_rows]
        return result

    def load_pending(self):
        """The unmerged vectors [pending rows, feature_dim] in the cache dtype,
        read from their files once (they are small batches, not yet merged)."""
        if self._vectors is None:
            self._vectors = np.concatenate(
                [
                    winner.source.load(winner.source.file)["bottleneck"][winner.rows]
                    for winner in self._winners
                ]
            )
        return self._vectors

    def close(self):
        if self._main is not None:
            self._main.close()


# The index arrays: (name, dtype); CacheFile attribute names differ for "key".
_INDEX = (
    ("key", "S64"),
    ("size", np.int64),
    ("mtime_ns", np.int64),
    ("sha256", "S64"),
    ("folder", "S16"),
)
_FIELDS = (
    ("key", "keys"),
    ("size", "size"),
    ("mtime_ns", "mtime_ns"),
    ("sha256", "sha256"),
    ("folder", "folder"),
)


def open_view(folder, path, identity, open_main):
    """A CacheView of the main file ``path`` and the unmerged files in ``folder``.

    The unmerged files are read before ``open_main()`` (-> CacheFile or None)
    is called: a merge by another process in between deletes some of them
    only after their rows are in the main file opened next, so no row is
    missed. Unusable unmerged files are left out here (the merge sets them
    aside and says so). Returns None when there is neither.
    """
    sources = merge.pending_sources(folder, path, identity)
    winners, pending_keys = merge.newest_records(sources, set_aside=False)
    main = open_main()
    if main is None and not winners:
        return None
    return CacheView(main, winners, pending_keys)


def blocks(cache, entries, block_rows, order_seed):
    """Yields (positions int64 [k] into ``entries``, float32 [k, feature_dim]) per block
    of ``block_rows`` file rows (``BottleneckCache.stream``); closes ``cache`` at the end."""
    try:
        rows = np.fromiter((cache.rows[e.key] for e in entries), np.int64, len(entries))
        order = np.argsort(rows, kind="stable")
        starts = np.flatnonzero(np.diff(rows[order] // block_rows, prepend=-1))
        groups = np.split(order, starts[1:])
        if order_seed is not None:
            np.random.default_rng(order_seed).shuffle(groups)
        for positions in groups:
            yield positions, cache.bottlenecks(rows[positions])
    finally:
        cache.close()
