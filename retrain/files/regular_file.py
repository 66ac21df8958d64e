"""Opening a local file only when it is a regular file of bounded size, without waiting.

Every local file retrain reads from somewhere it does not control (images,
a received output folder, its marker, a model to load) is opened here:

* with O_NONBLOCK, so a FIFO under the name returns at once instead of
  waiting forever for a writer (a socket fails to open, ENXIO);
* checked by ``fstat`` of the opened descriptor, so what is read is what was
  checked, even when the path was swapped for a FIFO or device after a check;
* optionally without following a symbolic link as the last part (O_NOFOLLOW:
  files of a received folder must be the files themselves; image folders,
  by contrast, may link to photos);
* optionally bounded in size before any byte is read.

A refusal is one exception, :class:`RefusedFile` (an OSError), whose
``strerror`` says what the path is; each caller turns that into its own message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_module


class RefusedFile(OSError):
    """A path that is not read: ``strerror`` says what it is, ``errno`` which case.

    ``errno`` is ELOOP ("a symbolic link"), EINVAL ("not a regular file (FIFO)")
    or EFBIG ("N bytes, more than the L read"); ``status`` is the opened file's
    ``os.stat_result`` (None for a symbolic link, which is never opened).
    """

    def __init__(self, code: int, reason: str, path, status: os.stat_result | None = None):
        super().__init__(code, reason, str(path))
        self.status = status


def kind(mode: int) -> str:
    """What an ``st_mode`` is, in words for an error: "FIFO", "socket", ..."""
    for test, name in (
        (stat_module.S_ISREG, "regular file"),
        (stat_module.S_ISDIR, "folder"),
        (stat_module.S_ISFIFO, "FIFO"),
        (stat_module.S_ISSOCK, "socket"),
        (stat_module.S_ISCHR, "character device"),
        (stat_module.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def not_regular(mode: int) -> str | None:
    """The reason a file of ``st_mode`` is not read ("not a regular file (FIFO)"), or None."""
    if stat_module.S_ISREG(mode):
        return None
    return f"not a regular file ({kind(mode)})"


@contextlib.contextmanager
def open_regular(path, *, follow_symlinks: bool, limit: int | None):
    """Opens the regular local file ``path``: yields (binary file, its ``os.stat_result``).

    ``follow_symlinks`` False refuses a symbolic link as the last part of the
    path; ``limit`` (bytes, or None for no bound) refuses a larger file before
    it is read. O_NONBLOCK is cleared again before the file is yielded. The
    file is closed on leaving the block.

    Raises:
      RefusedFile (an OSError): a symbolic link, not a regular file, or too large;
      OSError for other failures to open (FileNotFoundError when nothing is there).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_symlinks:  # O_NOFOLLOW met a link
            raise RefusedFile(errno.ELOOP, "a symbolic link", path) from None
        raise
    try:
        status = os.fstat(descriptor)
        reason = not_regular(status.st_mode)
        if reason:
            raise RefusedFile(errno.EINVAL, reason, path, status)
        if limit is not None and status.st_size > limit:
            raise RefusedFile(
                errno.EFBIG, f"{status.st_size:,} bytes, more than the {limit:,} read", path, status
            )
        os.set_blocking(descriptor, True)
        file = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with file:
        yield file, status
