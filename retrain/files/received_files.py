"""Reading the files of an output folder that may come from someone else.

`python -m retrain.report DIR` rebuilds a page from whatever DIR holds, and a
run reads the previous run's data checks from its output folder. Such a folder
may have been received (an archive, a shared drive), so what it holds is
checked before it is read:

* only a regular file is opened, never through a symbolic link (O_NOFOLLOW:
  a ``run_record.json`` linked to a file elsewhere is refused), and opening
  never waits (O_NONBLOCK: a FIFO named ``label_issues.csv`` is refused,
  not read forever);
* its size is bounded before any byte is read (a 5 GB ``run_record.json``
  is refused, not parsed).

The opening is ``regular_file.open_regular``'s; this module words its refusals
for a received folder.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from retrain.errors import RetrainError
from retrain.files import regular_file

# Largest run_record.json, CSV or JSON file read back: about 2 million images'
# rows (a record takes ~100 bytes an image).
MAX_TEXT_BYTES = 256 * 1024 * 1024


class NotRegularFile(RetrainError):
    """A path that is a symbolic link, FIFO, device, socket or folder, or is too large."""


def read_bytes(path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The content of the regular file `path`, at most `limit` bytes long.

    Raises:
      FileNotFoundError when nothing is there (callers decide if that is fine);
      NotRegularFile (a RetrainError) for a symbolic link, FIFO, device,
        socket or folder, or a file larger than limit;
      OSError for other failures to read.
    """
    path = Path(path)
    try:
        with regular_file.open_regular(path, follow_symlinks=False, limit=limit) as (file, _):
            chunks, left = [], limit + 1
            while left > 0:  # a file that grows while read is still cut at the limit
                chunk = file.read(min(left, 1 << 20))  # not read(limit + 1): that allocates it
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
    except regular_file.RefusedFile as refused:
        raise NotRegularFile(_refusal(path, refused, limit)) from None
    data = b"".join(chunks)
    if len(data) > limit:
        raise NotRegularFile(
            f"{path} grew beyond {limit:,} bytes while read. Received: a file "
            "that is still being written; rerun when it is complete."
        )
    return data


def _refusal(path: Path, refused: regular_file.RefusedFile, limit: int) -> str:
    """The message for a file `regular_file.open_regular` refused: what it is, and the fix."""
    if refused.errno == errno.ELOOP:
        return (
            f"{path} is a symbolic link; retrain reads only regular files "
            "of an output folder. Replace it with the file itself."
        )
    if refused.errno == errno.EFBIG:
        return (
            f"{path} is {refused.status.st_size:,} bytes, more than the "
            f"{limit:,} retrain reads back; it is not a file a run wrote. "
            "Remove it or rerun retrain."
        )
    return (
        f"{path} is not a regular file (a FIFO, device, socket or "
        "folder); retrain will not read it. Remove it or replace it "
        "with the file a run wrote."
    )


def read_text(path, limit: int = MAX_TEXT_BYTES) -> str:
    """`read_bytes` decoded as UTF-8 (UnicodeDecodeError, a ValueError, when it is not)."""
    return read_bytes(path, limit).decode("utf-8")


def is_regular(path) -> bool:
    """True when `path` itself (not a link's target) is a regular file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
