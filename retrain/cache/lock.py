"""The cache lock, and the one-line error for an OS error on the cache's files.

One process at a time changes a cache file (``<cache>.h5.lock``); a second
one waits, saying so, up to its timeout.
"""

import contextlib
import errno
import logging

import filelock

from retrain.errors import RetrainError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def locked(path, timeout):
    """Holds the cache lock ``<path>.lock`` for the block, waiting up to ``timeout`` seconds.

    Says on stderr that it waits when another process holds it; RetrainError
    when the wait runs out or the lock file is a symbolic link.
    """
    lock = filelock.FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        logger.info(
            "Another process is updating the bottleneck cache %s (lock %s); waiting up to %.0f s.",
            path,
            lock.lock_file,
            timeout,
        )
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise RetrainError(
                f"Gave up after {timeout:.0f} s waiting for another process "
                f"to release {lock.lock_file}; wait for it to finish, or use another "
                f"bottleneck_dir. Received: lock_timeout={timeout}"
            ) from None
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        # filelock (>= 3.20.1, CVE-2025-68146) opens the lock with O_NOFOLLOW,
        # so a planted link is refused instead of truncating its target.
        raise RetrainError(
            f"The lock file {lock.lock_file} is a symbolic link; retrain does not follow "
            "it (it could point at any file). Remove the link and run again."
        ) from None
    try:
        yield
    finally:
        lock.release()


def cache_error(action, path, error):
    """RetrainError for an OSError on the cache file or its folder."""
    if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        fix = "Another program has the file open (HDF5 file lock); close it or wait"
    else:
        fix = "Free space, fix the permissions or choose another folder"
    return RetrainError(
        f"Cannot {action} the bottleneck cache {path}: {error.strerror or error}. {fix}. "
        f"Received: bottleneck_dir={path.parent}"
    )
