"""Opening the cache to read vectors: every entry asked for present, or a RetrainError saying why.

`open_for_reading` is what ``BottleneckCache.read`` and ``.stream`` stand on:
the main file and any records whose merge was deferred (a ``view.CacheView``),
with a message naming the cache and what to run when it is absent, unreadable
or lacks an entry.
"""

from retrain.cache import lock, store, view
from retrain.errors import RetrainError


def open_for_reading(folder, path, identity, entries) -> view.CacheView:
    """The cache (view.CacheView: the main file and any records whose merge
    was deferred) with every entry in it; else RetrainError.

    folder: the bottleneck_dir (str, local); path: the cache file (Path);
    identity: its CacheIdentity; entries: ImageEntry list. The caller closes
    the view.
    """
    try:
        cache = view.open_view(folder, path, identity, lambda: _main_file(path, identity))
        if cache is not None and cache.pending:
            cache.load_pending()  # now, while the files are certainly there
    except OSError as error:
        raise lock.cache_error("read", path, error) from None
    if cache is None:
        raise RetrainError(
            f"There is no bottleneck cache {path} yet; run "
            "BottleneckCache.update (or retrain --cache_only) first."
        )
    missing = [e.relative_path for e in entries if e.key not in cache.rows]
    if missing:
        cache.close()
        raise RetrainError(
            f"{len(missing)} of {len(entries)} images are not in the bottleneck "
            f"cache {path}, e.g. {missing[0]}; run BottleneckCache.update "
            "on their ImageList first and leave out CacheReport.failed."
        )
    return cache


def _main_file(path, identity):
    """The open store.CacheFile at ``path``, None when absent; RetrainError when unreadable."""
    if not path.exists():
        return None
    try:
        return store.CacheFile(path, identity)
    except store.UnreadableCache as error:
        raise RetrainError(
            f"The bottleneck cache {path} cannot be read ({error}); "
            "run BottleneckCache.update (or retrain --cache_only) to build it."
        ) from None
