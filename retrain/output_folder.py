"""One complete run per output folder: write into a staging folder, swap it in at the end.

A run writes all its outputs (model, labels, settings, metrics, skipped list,
summaries, reports, exports) into a staging folder beside ``--output_dir``,
``.<name>.staging-<pid>``. Only when every writer has finished is the staging
folder fsynced and swapped with the output folder in one step (Linux
``renameat2(RENAME_EXCHANGE)``; elsewhere, or on file systems without it, two
renames a moment apart). So the output folder always holds one complete run:
a run that fails, is interrupted or is killed leaves the previous outputs as
they were.

One run at a time may use an output folder: a lock file beside it
(``.<name>.lock``) is taken when the run starts, and a second run exits at
once saying the folder is in use. Staging folders of killed runs are removed
by the next run.

Each run replaces the whole folder, so it must not hold anything else: an
existing folder must be empty or written by retrain (it holds settings.yaml),
and the image and cache folders must lie outside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import filelock

from retrain import atomic_write
from retrain.errors import RetrainError

# What every output folder holds: a folder without it was not written by retrain.
RUN_MARKER = "settings.yaml"


class OutputFolder:
    """The staging folder of one run and the outputs that live outside it.

    ``final``: the output folder the user named; ``staging``: where writers
    write now. Call ``place(path)`` for a path given by the user (it may lie
    outside the output folder) to learn where to write it.
    """

    def __init__(self, final: Path, staging: Path):
        self.final = final
        self.staging = staging
        self._outside = []  # (temporary, final path) of files outside the folder

    def place(self, path) -> Path:
        """Where to write `path` during the run.

        Inside the output folder: the same place in the staging folder. A file
        elsewhere (e.g. --output_graph /models/x.keras) is written to a
        temporary name beside it and renamed at the end of the run.
        """
        path = Path(path)
        try:
            return self.staging / _absolute(path).relative_to(_absolute(self.final))
        except ValueError:
            temporary = atomic_write.temporary_path(path)
            self._outside.append((temporary, path))
            return temporary

    def place_folder(self, path) -> Path:
        """Where to write the folder `path` (e.g. --summaries_dir) during the run.

        Inside the output folder: the same place in the staging folder;
        elsewhere, the folder itself (it is written in place).
        """
        path = Path(path)
        try:
            return self.staging / _absolute(path).relative_to(_absolute(self.final))
        except ValueError:
            return path

    def _commit(self) -> None:
        atomic_write.fsync_tree(self.staging)
        for temporary, _ in self._outside:
            if temporary.exists():
                atomic_write.fsync_path(temporary)
        atomic_write.swap_folder(self.staging, self.final)
        for temporary, final in self._outside:
            if temporary.exists():
                os.replace(temporary, final)
                atomic_write.fsync_path(final.parent)

    def _discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        for temporary, _ in self._outside:
            with contextlib.suppress(OSError):
                temporary.unlink()


@contextlib.contextmanager
def staged(output_dir, inputs=()):
    """Yields an OutputFolder; swaps its staging folder in when the block ends normally.

    Args:
      output_dir: the output folder (str or Path); need not exist yet.
      inputs: folders the run reads or keeps (image_dir, bottleneck_dir),
        which must not lie inside output_dir.

    Raises:
      RetrainError, before the block runs, when output_dir cannot be used
      (a file, inside a file, holds other files, holds an input, or another
      run uses it); and when the block raises OSError, naming the folder and
      the cause (the previous outputs are then unchanged).
    """
    final = _absolute(Path(output_dir))
    _check_usable(final, inputs)
    lock = _acquire(final)
    try:
        for leftover in final.parent.glob(f".{final.name}.staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = final.parent / f".{final.name}.staging-{os.getpid()}"
        try:
            staging.mkdir()
        except OSError as error:
            raise _write_error(error, final) from None
        folder = OutputFolder(final, staging)
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


def _check_usable(final: Path, inputs) -> None:
    if final.exists() and not final.is_dir():
        raise RetrainError(
            f"The output folder is a file. Choose a folder with --output_dir. "
            f"Received: output_dir={final}"
        )
    here = _absolute(Path.cwd())
    if final == here or final in here.parents:
        raise RetrainError(
            "output_dir holds the current folder, which each run would replace as a whole; "
            f"choose a folder elsewhere. Received: output_dir={final}"
        )
    for name, folder in inputs:
        if folder is None:
            continue
        inside = _absolute(Path(folder))
        if inside == _absolute(final) or _absolute(final) in inside.parents:
            raise RetrainError(
                f"{name} lies inside output_dir, which each run replaces as a whole; choose "
                f"folders apart. Received: {name}={folder}, output_dir={final}"
            )
    if final.is_dir():
        try:
            names = os.listdir(final)
        except OSError as error:
            raise _write_error(error, final) from None
        if names and RUN_MARKER not in names:
            raise RetrainError(
                f"The output folder {final} holds files that retrain did not write "
                f"(e.g. {sorted(names)[0]!r}), and each run replaces the whole folder. "
                f"Choose a new or empty folder with --output_dir. Received: output_dir={final}"
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


def _write_error(error: OSError, final: Path) -> RetrainError:
    where = Path(error.filename).parent if error.filename else final.parent
    return RetrainError(
        f"Cannot write the outputs in {where}: {error.strerror or error}. The previous "
        f"outputs in {final} are unchanged; free space or choose a writable --output_dir. "
        f"Received: output_dir={final}"
    )
