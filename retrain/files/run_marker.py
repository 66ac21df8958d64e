"""Which files in an output folder are retrain's: the run marker, carrying the rest over.

A folder is retrain's only by its marker, ``.retrain-run.json``
({"tool": "retrain", "format": 1, "run_id": <uuid4 hex>, "files": [...]}),
which every staging folder gets when it is made (``files`` null while the run
runs) and again, listing the relative names the run wrote (folders end in
"/"), just before its swap. A run never deletes a file it did not write: when
a swap has replaced a folder, the names its marker lists are deleted and
everything else is moved into the new folder (``clear_previous``). Folders
that killed runs left beside the output folder are finished the same way by
the next run (``finish_leftovers``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from retrain.files import atomic_write, regular_file

logger = logging.getLogger(__name__)

# The file that makes a folder retrain's; a common name (settings.yaml) never does.
MARKER = ".retrain-run.json"
MARKER_FORMAT = 1
# A marker larger than this is not one of ours (a run writes a few thousand names).
MAX_MARKER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Marker:
    """A folder's marker: its run id and the relative names the run wrote (None while running)."""

    run_id: str
    files: frozenset | None


def write_marker(folder: Path, run_id: str, files) -> None:
    """Writes ``folder``'s marker: ``files`` the relative names the run wrote, None while it runs."""
    document = {
        "tool": "retrain",
        "format": MARKER_FORMAT,
        "run_id": run_id,
        "files": None if files is None else sorted(files),
    }
    # ensure_ascii: names that are not UTF-8 survive as \\udcxx escapes.
    atomic_write.write_text(folder / MARKER, json.dumps(document, indent=0) + "\n")


def read_marker(folder: Path) -> Marker | None:
    """``folder``'s marker, or None when it has none or the file is not a valid one.

    The file is opened without following a symlink and without blocking (a
    FIFO planted under the name is no marker), and read only when small.
    """
    try:
        with regular_file.open_regular(
            folder / MARKER, follow_symlinks=False, limit=MAX_MARKER_BYTES
        ) as (handle, _):
            document = json.loads(handle.read())
    except (OSError, ValueError):  # RefusedFile too: a link, FIFO or huge file is no marker
        return None
    if (
        not isinstance(document, dict)
        or document.get("tool") != "retrain"
        or document.get("format") != MARKER_FORMAT
    ):
        return None
    run_id, files = document.get("run_id"), document.get("files")
    if not isinstance(run_id, str) or len(run_id) != 32 or set(run_id) - set("0123456789abcdef"):
        return None
    if files is not None and (
        not isinstance(files, list) or not all(isinstance(name, str) for name in files)
    ):
        return None
    return Marker(run_id, None if files is None else frozenset(files))


def written_names(folder: Path) -> set[str]:
    """Relative names of everything below ``folder`` but its marker; folders end in "/"."""
    names = set()
    for root, dirnames, filenames in os.walk(folder):
        prefix = os.path.relpath(root, folder)
        prefix = "" if prefix == "." else prefix.replace(os.sep, "/") + "/"
        names.update(prefix + name + "/" for name in dirnames)
        names.update(prefix + name for name in filenames)
    names.discard(MARKER)
    return names


def foreign_names(folder: Path, written: frozenset, prefix: str = "") -> list[str]:
    """Relative names below ``folder`` that are not in ``written``, outermost only.

    A real folder listed as written is looked into; anything else not listed
    (a file, a symlink, a folder the run did not make) is foreign as a whole.
    """
    found = []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        name = prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
            if name + "/" in written:
                found += foreign_names(Path(entry.path), written, name + "/")
            else:
                found.append(name)
        elif name not in written and name != MARKER:
            found.append(name)
    return found


def clear_previous(old: Path, final: Path, run_id: str, carry_unmarked: bool = True) -> None:
    """Empties ``old`` (the folder a swap replaced) without deleting anyone else's file.

    The names its marker lists are deleted; everything else is moved into
    ``final`` (``carry``). A marker still being written (files None) means a
    run's staging folder: all of it is that run's. Without a marker, all of
    it is carried, or, with ``carry_unmarked`` False, it is left as it is.
    Errors are warnings: the run they follow is complete.
    """
    marker = read_marker(old)
    try:
        if marker is not None and marker.files is None:
            shutil.rmtree(old)
            return
        if marker is None and not carry_unmarked and os.listdir(old):
            logger.warning("Left %s as it is: it holds files retrain did not write.", old)
            return
        written = frozenset() if marker is None else marker.files
        for name in foreign_names(old, written):
            carry(old / name, final, name, run_id)
        _delete_written(old, written)
    except OSError as error:
        logger.warning(
            "Could not empty %s (%s); what it holds is kept there.", old, error.strerror or error
        )


def carry(source: Path, final: Path, name: str, run_id: str) -> Path:
    """Moves ``source`` to ``final/name``; a name the new run wrote keeps the run's file
    and gives the user's one ``<stem>.kept-<run id><suffix>`` beside it. Returns where it went."""
    destination = final / name
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # the new run wrote a file where the user's folder was
        destination = final / destination.name
    kept = destination
    for number in range(1000):
        if not os.path.lexists(kept):
            break
        tag = run_id[:8] if number == 0 else f"{run_id[:8]}-{number}"
        kept = destination.with_name(f"{Path(name).stem}.kept-{tag}{Path(name).suffix}")
    if os.path.lexists(kept):  # os.rename would replace it
        raise FileExistsError(errno.EEXIST, "no free name to keep it under", str(source))
    os.rename(source, kept)
    if kept != final / name:
        logger.warning(
            "%s in the output folder was not written by retrain; the new run wrote "
            "that name too, so it is kept as %s.",
            name,
            kept,
        )
    return kept


def _delete_written(old: Path, written: frozenset) -> None:
    """Deletes the listed files and (empty) folders of ``old``, its marker, then ``old``."""
    for root, dirnames, filenames in os.walk(old, topdown=False):
        prefix = os.path.relpath(root, old)
        prefix = "" if prefix == "." else prefix.replace(os.sep, "/") + "/"
        for name in filenames:
            if prefix + name in written:
                os.unlink(os.path.join(root, name))
        for name in dirnames:
            if prefix + name + "/" in written:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(root, name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(old / MARKER)
    try:
        old.rmdir()
    except OSError:
        logger.warning("Left %s: it holds files retrain did not write.", old)


def finish_leftovers(final: Path) -> None:
    """Finishes the folders killed runs left beside ``final`` (the caller holds its lock).

    Only exact names count, ``.<name>.staging-<pid>`` and ``.<name>.previous-<pid>``,
    real folders (not symlinks) whose process is gone. A previous folder
    whose output folder is missing (a crash between two renames) is put back.
    """
    prefix = f".{final.name}."
    for name in sorted(os.listdir(final.parent)):
        kind, dash, pid = name[len(prefix) :].partition("-")
        if (
            not name.startswith(prefix)
            or kind not in ("staging", "previous")
            or not dash
            or not (pid.isascii() and pid.isdigit())
            or _alive(int(pid))
        ):
            continue
        path = final.parent / name
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            continue
        if kind == "previous" and not os.path.lexists(final):
            os.rename(path, final)
            logger.warning(
                "Put back the output folder %s, which a killed run left at %s.", final, path
            )
        else:
            clear_previous(path, final, uuid.uuid4().hex, carry_unmarked=kind == "previous")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs; this process's own leftovers are stale (it holds the lock)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
