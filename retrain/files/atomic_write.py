"""Atomic, durable file writes: the one way retrain replaces a file.

A file is written under a temporary name beside its target, fsynced, renamed
over the target and the folder fsynced, so a reader (or the next run after a
crash, SIGKILL or power cut) sees the old file or the complete new one, never
a mix. Every writer that replaces a file in place uses this module: exports,
labels, settings, the converted-weights cache and the bottleneck cache's main
file and journal.

Temporary names are hidden and keep the target's suffix (Keras insists on
``.keras``, ``np.savez`` appends ``.npz`` otherwise):
``.<stem>.tmp-<pid>-<random><suffix>``. ``leftovers`` finds the ones a killed
process left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path

_MARK = ".tmp-"


def temporary_path(path) -> Path:
    """A fresh hidden name beside ``path`` with the same suffix."""
    path = Path(path)
    return path.with_name(f".{path.stem}{_MARK}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def leftovers(folder, target=None) -> list[Path]:
    """Temporary files of killed writers in ``folder`` (only ``target``'s, if given)."""
    folder = Path(folder)
    if target is None:
        return sorted(folder.glob(f".*{_MARK}*"))
    target = Path(target)
    return sorted(folder.glob(f".{target.stem}{_MARK}*{target.suffix}"))


def is_temporary(path) -> bool:
    """True for a name made by ``temporary_path``."""
    name = Path(path).name
    return name.startswith(".") and _MARK in name


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary Path beside ``path`` for the caller to write.

    When the block ends normally the file is fsynced and renamed over
    ``path`` and the folder is fsynced; when it raises (OSError, KeyboardInterrupt,
    anything) the temporary file is removed and ``path`` is untouched. The
    parent folder is created if needed. OSError propagates unchanged: the
    caller knows what the file is for and says so.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        fsync_path(temporary)
        os.replace(temporary, path)
        fsync_path(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


@contextlib.contextmanager
def atomic_folder(path, seal=None, clear_old=None):
    """Yields a temporary folder beside ``path`` for the caller to fill (a SavedModel).

    When the block ends normally, ``seal(temporary)`` runs (if given: e.g. to
    write a marker listing what the folder holds), the folder is fsynced and
    takes the place of ``path`` (``swap_folder``), and ``clear_old(old)``
    empties the folder it replaced (default: deletes it). When the block
    raises, the temporary folder is removed and ``path`` is untouched.
    OSError propagates unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    temporary.mkdir()
    try:
        yield temporary
        if seal is not None:
            seal(temporary)
        fsync_tree(temporary)
        old = swap_folder(temporary, path)
        if old is not None:
            (clear_old or _remove_tree)(old)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def write_bytes(path, data: bytes) -> Path:
    """Replaces ``path`` with ``data`` atomically; returns the path."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    """Replaces ``path`` with ``text`` as UTF-8, '\\n' line ends, atomically."""
    return write_bytes(path, text.encode("utf-8"))


def fsync_path(path) -> None:
    """Flushes a file's or a folder's data and metadata to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder) -> None:
    """fsyncs every file and folder below ``folder``, deepest first, then ``folder``."""
    for root, dirnames, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_path(path)
        for name in dirnames:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_path(path)
    fsync_path(folder)


def swap_folder(staging: Path, final: Path) -> Path | None:
    """Makes the folder ``staging`` the folder at ``final``.

    Returns where the old ``final`` is now, for the caller to empty: ``staging``
    after an exchange, a hidden name beside ``final``
    (``.<name>.previous-<pid>``) after two renames, None when there was none.

    One renameat2(RENAME_EXCHANGE) where the kernel and file system have it,
    so a crash leaves the old or the new folder at ``final``. Elsewhere two
    renames: old ``final`` -> previous, ``staging`` -> ``final``; when the
    second fails the first is undone, so ``final`` keeps the old folder. Raises
    OSError, unchanged, when nothing moved or the old folder was put back; if
    even that fails, the error's message says where the old folder is.
    """
    if not os.path.lexists(final):
        os.rename(staging, final)
        fsync_path(final.parent)
        return None
    if _exchange(staging, final):
        fsync_path(final.parent)
        return staging
    previous = final.parent / f".{final.name}.previous-{os.getpid()}"
    os.rename(final, previous)
    try:
        os.rename(staging, final)
    except OSError as error:
        try:
            os.rename(previous, final)
        except OSError:
            raise OSError(
                error.errno,
                f"{error.strerror}; the previous folder {final} could not "
                f"be put back and is now at {previous} (the next run puts it back)",
                error.filename,
            ) from error
        raise
    fsync_path(final.parent)
    return previous


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swaps two paths with renameat2; False where that is not available."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if (
        renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
        == 0
    ):
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))
