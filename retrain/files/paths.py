"""Files on the local disk or behind a URL that ``tf.io.gfile`` reads (gs://...).

A path with a scheme (``gs://bucket/photos``, ``ram://...``) goes through
TensorFlow's file systems, so a Beam job on a cluster can read images from,
and write shards to, a bucket; a local path goes through the operating system
(exact nanosecond mtimes, fsync, symbolic links). A local file is read only
when it is a regular file (``regular_file.open_regular``): it is opened without
waiting (a FIFO would block ``open`` until a writer comes) and checked on the
opened descriptor, so a file swapped for a FIFO or device after a check is
still refused. URLs stay ``str``: a
``pathlib.Path`` would fold their ``//``. Errors from TensorFlow are raised
as OSError, like the local ones, with the reason in ``strerror``.
"""

import contextlib
import os

from retrain.files import regular_file
from retrain.quiet_tensorflow import import_tensorflow


def is_url(path):
    """True for ``scheme://...`` paths."""
    return "://" in str(path)


def join(folder, *names):
    """``folder/name/...`` as a str, keeping a URL's ``//``."""
    if is_url(folder):
        return "/".join([str(folder).rstrip("/"), *names])
    return os.path.join(folder, *names)


@contextlib.contextmanager
def _as_os_error():
    tf = import_tensorflow()
    try:
        yield tf.io.gfile
    except tf.errors.OpError as error:
        raise OSError(0, error.message) from None


def stat(path):
    """(size in bytes, mtime in ns) of a file; OSError if it cannot be read.

    Through ``tf.io.gfile`` the mtime has whatever resolution the file system
    reports (whole seconds for local files), so compare it only with mtimes
    read the same way.
    """
    if not is_url(path):
        status = os.stat(path)
        return status.st_size, status.st_mtime_ns
    with _as_os_error() as gfile:
        status = gfile.stat(path)
    return status.length, status.mtime_nsec


@contextlib.contextmanager
def open_regular(path):
    """Opens a regular file for reading: yields (binary file, size in bytes, mtime in ns).

    A local path goes through ``regular_file.open_regular`` (no waiting on a
    FIFO, checked on the opened descriptor, no size bound); symbolic links are
    followed: image folders may link to photos.

    Raises:
      OSError: cannot be opened; or (errno EINVAL) not a regular file, with
        ``strerror`` naming what it is ("not a regular file (FIFO)").
    """
    if is_url(path):
        length, mtime_ns = stat(path)
        with _as_os_error() as gfile, gfile.GFile(path, "rb") as file:
            yield file, length, mtime_ns
        return
    with regular_file.open_regular(path, follow_symlinks=True, limit=None) as (file, status):
        yield file, status.st_size, status.st_mtime_ns


def read(path, size=-1):
    """(the first ``size`` bytes, or all, of a file, its size, its mtime in ns).

    Only regular files are read (see ``open_regular``); to bound what is
    read, pass ``size``.
    """
    with open_regular(path) as (file, length, mtime_ns):
        return file.read(size), length, mtime_ns


def write(path, data):
    """Writes bytes to a file (not atomically), creating its folder."""
    if not is_url(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as file:
            file.write(data)
        return
    with _as_os_error() as gfile:
        gfile.makedirs(path.rsplit("/", 1)[0])
        with gfile.GFile(path, "wb") as file:
            file.write(data)


def remove(path):
    if not is_url(path):
        os.unlink(path)
        return
    with _as_os_error() as gfile:
        gfile.remove(path)


def is_dir(path):
    if not is_url(path):
        return os.path.isdir(path)
    with _as_os_error() as gfile:
        return gfile.isdir(path)


def list_dir(path):
    """The names in a folder (sub-folder names without a trailing slash)."""
    if not is_url(path):
        return os.listdir(path)
    with _as_os_error() as gfile:
        return [name.rstrip("/") for name in gfile.listdir(path)]


def walk(top, onerror=None):
    """``os.walk(top, followlinks=True)``, or ``tf.io.gfile.walk`` for a URL."""
    if not is_url(top):
        return os.walk(top, followlinks=True, onerror=onerror)

    def report(error):
        if onerror is not None:
            onerror(OSError(0, error.message, top))

    return import_tensorflow().io.gfile.walk(top, onerror=report)
