"""One complete run per output folder: write into a staging folder, swap it in at the end.

A run writes all its outputs (model, labels, settings, metrics, skipped list,
summaries, reports, exports) into a staging folder beside ``--output_dir``,
``.<name>.staging-<pid>``. Only when every writer has finished is the staging
folder fsynced and swapped with the output folder in one step (Linux
``renameat2(RENAME_EXCHANGE)``; elsewhere, or on file systems without it, two
renames a moment apart). So the output folder always holds one complete run:
a run that fails, is interrupted or is killed leaves the previous outputs as
they were. ``--cache_only`` and shard runs never come here: they write
nothing into the output folder.

A folder is retrain's only by its marker, ``.retrain-run.json``, which lists
the names its run wrote (``retrain.files.run_marker``). A run never deletes a file
it did not write:

- a non-empty folder without a valid marker (someone else's, or one written
  by a retrain version before markers) is refused before any work;
- whatever the folder holds at the swap that its previous run did not write
  is moved into the new folder, at the same relative name; where the new run
  wrote that name too, the user's file is kept as ``<stem>.kept-<id><suffix>``
  with a warning;
- a mount point is refused before any work (it cannot be renamed); a
  sub-folder of it works.

One run at a time may use an output folder: a lock file beside it
(``.<name>.lock``) is taken when the run starts, and a second run exits at
once saying the folder is in use. Folders of killed runs beside it
(``.<name>.staging-<pid>``, ``.<name>.previous-<pid>``, exact names, owner no
longer alive) are finished by the next run: its own files deleted, anything
else carried into the output folder, a lost output folder put back.

Paths are compared as real paths (symlinks resolved), and the folder is
checked again just before the swap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

import filelock

from retrain.errors import RetrainError
from retrain.files import atomic_write
from retrain.files.run_marker import (
    MARKER,
    clear_previous,
    finish_leftovers,
    read_marker,
    write_marker,
    written_names,
)


class OutputFolder:
    """The staging folder of one run and the outputs that live outside it.

    ``final``: the output folder the user named, as a real path; ``staging``:
    where writers write now. Call ``place(path)`` for a path given by the user
    (it may lie outside the output folder) to learn where to write it.
    """

    def __init__(
        self, final: Path, staging: Path, given: Path | None = None, run_id: str | None = None
    ):
        self.final = final
        self.staging = staging
        self.run_id = run_id or uuid.uuid4().hex
        self._given = given or final  # output_dir as named, symlinks kept
        self._outside = []  # (temporary, final path) of files outside the folder
        self._swapped = False

    def _inside(self, path: Path) -> Path | None:
        """``path`` relative to the output folder (as named or as real path), or None."""
        for base, candidate in (
            (self._given, _absolute(path)),
            (self.final, _absolute(path)),
            (self.final, _real(path.parent) / path.name),
        ):
            with contextlib.suppress(ValueError):
                return candidate.relative_to(base)
        return None

    def place(self, path) -> Path:
        """Where to write `path` during the run.

        Inside the output folder: the same place in the staging folder. A file
        elsewhere (e.g. --output_graph /models/x.keras) is written to a
        temporary name beside it and renamed at the end of the run.
        """
        path = Path(path)
        relative = self._inside(path)
        if relative is not None:
            return self.staging / relative
        temporary = atomic_write.temporary_path(path)
        self._outside.append((temporary, path))
        return temporary

    def place_folder(self, path) -> Path:
        """Where to write the folder `path` (e.g. --summaries_dir) during the run.

        Inside the output folder: the same place in the staging folder;
        elsewhere, the folder itself (it is written in place).
        """
        path = Path(path)
        relative = self._inside(path)
        return path if relative is None else self.staging / relative

    def _commit(self) -> None:
        atomic_write.fsync_tree(self.staging)
        for temporary, _ in self._outside:
            if temporary.exists():
                atomic_write.fsync_path(temporary)
        write_marker(self.staging, self.run_id, written_names(self.staging))
        _check_path(self._given, self.final)  # again: the folder may have changed during the run
        old = atomic_write.swap_folder(self.staging, self.final)
        self._swapped = True
        if old is not None:
            clear_previous(old, self.final, self.run_id)
        for temporary, final in self._outside:
            if temporary.exists():
                os.replace(temporary, final)
                atomic_write.fsync_path(final.parent)

    def _discard(self) -> None:
        if not self._swapped:  # before the swap the staging folder holds only this run's files
            shutil.rmtree(self.staging, ignore_errors=True)
        for temporary, _ in self._outside:
            with contextlib.suppress(OSError):
                temporary.unlink()


@contextlib.contextmanager
def staged(output_dir, inputs=()):
    """Yields an OutputFolder; swaps its staging folder in when the block ends normally.

    Args:
      output_dir: the output folder (str or Path); need not exist yet.
      inputs: (name, folder) pairs the run reads or keeps (image_dir,
        bottleneck_dir), which must not lie inside output_dir.

    Raises:
      RetrainError, before the block runs, when output_dir cannot be used
      (a file, inside a file, a mount point, holds files but no marker, holds
      an input, or another run uses it); and when the block raises OSError or
      the folder changed under the run, naming the folder and the cause (the
      previous outputs are then unchanged).
    """
    given = _absolute(Path(output_dir))
    final = _real(given)
    _check_usable(final, inputs)
    _check_path(given, final)
    lock = _acquire(final)
    try:
        _check_owned(final)
        try:
            finish_leftovers(final)
        except OSError as error:
            raise _write_error(error, final) from None
        folder = OutputFolder(final, final.parent / f".{final.name}.staging-{os.getpid()}", given)
        try:
            folder.staging.mkdir()  # fails on a folder of that name it did not make
            try:
                write_marker(folder.staging, folder.run_id, None)
            except OSError:
                shutil.rmtree(folder.staging, ignore_errors=True)
                raise
        except OSError as error:
            raise _write_error(error, final) from None
        try:
            yield folder
            folder._commit()
        except OSError as error:
            raise _write_error(error, final) from None
        finally:
            folder._discard()
    finally:
        lock.release()


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _check_usable(final: Path, inputs) -> None:
    """The checks that need no lock: where the folder lies against the inputs and the cwd."""
    here = _real(Path.cwd())
    if final == here or final in here.parents:
        raise RetrainError(
            "output_dir holds the current folder, which each run would replace as a whole; "
            f"choose a folder elsewhere. Received: output_dir={final}"
        )
    for name, folder in inputs:
        if folder is None:
            continue
        inside = _real(folder)
        if inside == final or final in inside.parents:
            raise RetrainError(
                f"{name} lies inside output_dir, which each run replaces as a whole; choose "
                f"folders apart. Received: {name}={folder}, output_dir={final}"
            )


def _check_path(given: Path, final: Path) -> None:
    """output_dir still leads to ``final``, which is a folder (or absent) and no mount point."""
    if _real(given) != final:
        raise RetrainError(
            f"output_dir {given} was changed during the run: it now leads to {_real(given)}, "
            f"not {final}. Run again with a folder nobody moves. Received: output_dir={given}"
        )
    if os.path.lexists(final) and not final.is_dir():
        raise RetrainError(
            f"The output folder is a file. Choose a folder with --output_dir. "
            f"Received: output_dir={final}"
        )
    if final.is_dir() and os.path.ismount(final):
        raise RetrainError(
            f"The output folder {final} is a mount point, which cannot be renamed, and a run "
            f"replaces its folder as a whole at its end: use a sub-folder of it, e.g. "
            f"--output_dir {final / 'retrain'}. Received: output_dir={final}"
        )


def _check_owned(final: Path) -> None:
    """A folder that holds files must hold a marker of retrain's: nothing else is replaced."""
    if not final.is_dir() or read_marker(final) is not None:
        return
    try:
        names = sorted(os.listdir(final))
    except OSError as error:
        raise _write_error(error, final) from None
    if names:
        raise RetrainError(
            f"The output folder {final} holds files but no {MARKER} of a retrain run (e.g. "
            f"{names[0]!r}; older retrain versions wrote none), and retrain replaces only "
            f"folders it wrote. Move those files away, or choose a new or empty --output_dir. "
            f"Received: output_dir={final}"
        )


def _acquire(final: Path) -> filelock.BaseFileLock:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(final.parent / f".{final.name}.lock")
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise RetrainError(
            f"The output folder {final} is in use by another retrain run (lock "
            f"{lock.lock_file}). Wait for it to finish, or choose another --output_dir. "
            f"Received: output_dir={final}"
        ) from None
    except OSError as error:
        raise RetrainError(
            f"Cannot use the output folder {final}: {error.strerror or error}. Choose a "
            f"writable folder with --output_dir. Received: output_dir={final}"
        ) from None
    return lock


# What to do about an error while writing or swapping the outputs, by errno.
_ADVICE = {
    errno.ENOSPC: "free space or choose another --output_dir",
    errno.EDQUOT: "free space (disk quota) or choose another --output_dir",
    errno.EROFS: "choose a writable --output_dir",
    errno.EACCES: "choose a writable --output_dir",
    errno.EPERM: "choose a writable --output_dir",
    errno.EBUSY: "the folder is busy (a mount point, or held by another program) and cannot "
    "be replaced; use a sub-folder of it as --output_dir",
    errno.EXDEV: "the output folder is on another file system than the folder beside it "
    "(a mount point?); use a sub-folder of it as --output_dir",
}


def _write_error(error: OSError, final: Path) -> RetrainError:
    where = Path(error.filename).parent if error.filename else final.parent
    advice = _ADVICE.get(error.errno, "fix the cause or choose another --output_dir")
    return RetrainError(
        f"Cannot write the outputs in {where}: {error.strerror or error}. The previous "
        f"outputs in {final} are unchanged; {advice}. Received: output_dir={final}"
    )
