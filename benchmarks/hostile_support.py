"""What benchmarks/hostile_check.py is built from: processes and snapshots.

* ``Process``: a ``python -m retrain...`` subprocess run as a user would (its
  own session, stdin closed, stdout/stderr to log files), with a timeout, its
  exit status, wall time and peak resident memory (``os.wait4``);
  ``run_problems`` turns a finished run into the list of what is wrong with it.
* Snapshots to compare before/after: ``tree`` (every entry of a folder, files
  by sha256, never following a symlink nor opening a non-regular file),
  ``cache_rows`` (every cached vector: main HDF5 files, journal and shard
  files), ``Planted`` (a user's files: bytes and modification time).
(The crafted hostile files are in hostile_files.py.) Nothing here writes
outside the paths it is given.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Exit statuses that promise exactly one line on stderr (README, Settings).
FAILURE_CODES = (2, 130, 143)
# Lines a run may print on stderr besides its error: logging's, TensorFlow's
# C++ log and tqdm's progress bars.
_NOISE = re.compile(
    r"^(WARNING|INFO|DEBUG)[:\s]|^[IWEF]\d{4} \d\d:\d\d:\d\d|"
    r"^To enable the following instructions"
)
_PROGRESS = re.compile(r"\d+%\|")
_ERROR = re.compile(
    r"^(python -m )?(retrain|label_image)[\w.-]*: "
    r"(error|interrupted|terminated)\b"
)
PLANTED_MTIME_NS = 1_577_880_000_000_000_000  # 2020-01-01: any rewrite shows


@dataclasses.dataclass
class Result:
    """A finished process: ``code`` is its exit status (-N: killed by signal N)."""

    name: str
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float
    timed_out: bool

    def describe(self) -> str:
        what = "timed out" if self.timed_out else f"exit {self.code}"
        return f"{what} in {self.seconds:.1f} s"


class Process:
    """One subprocess, started at once; ``wait`` reaps it with ``os.wait4``."""

    counter = 0

    def __init__(self, args, log_dir: Path, name: str, env=None, log_prefix=""):
        Process.counter += 1
        self.name = name
        safe = re.sub(r"[^\w.-]", "_", f"{log_prefix}-{name}")
        stem = log_dir / f"{Process.counter:03d}-{safe}"
        self.out_path, self.err_path = Path(f"{stem}.stdout"), Path(f"{stem}.stderr")
        environment = dict(os.environ, **(env or {}))
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                [str(a) if not isinstance(a, bytes) else a for a in args],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=environment,
                start_new_session=True,
            )
        self.started = time.monotonic()
        self.result = None

    def poll(self) -> Result | None:
        """The Result when the process has ended, else None (never blocks)."""
        if self.result is None:
            pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
            if pid:
                self._finish(status, usage, timed_out=False)
        return self.result

    def signal(self, number: int, group: bool = False) -> None:
        """Sends `number` to the process, or to its whole group (a terminal's Ctrl-C)."""
        if self.poll() is None:
            (os.killpg if group else os.kill)(self.popen.pid, number)

    def wait(self, timeout: float) -> Result:
        """Waits at most `timeout` seconds; then kills the whole group and reports a timeout."""
        deadline = self.started + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(self.popen.pid, signal.SIGKILL)
                _, status, usage = os.wait4(self.popen.pid, 0)
                self._finish(status, usage, timed_out=True)
                break
            time.sleep(0.05)
        return self.result

    def _finish(self, status, usage, timed_out):
        code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = code  # reaped here: Popen must not wait for it again
        self.result = Result(
            self.name,
            code,
            self.out_path.read_text(errors="backslashreplace"),
            self.err_path.read_text(errors="backslashreplace"),
            time.monotonic() - self.started,
            usage.ru_maxrss / 1024,
            timed_out,
        )


def message_lines(stderr: str) -> list[str]:
    """stderr's lines without progress bars, logging's and TensorFlow's log lines."""
    lines = []
    for line in stderr.split("\n"):
        lines += [
            part
            for part in line.split("\r")
            if part.strip() and not _PROGRESS.search(part) and not _NOISE.match(part)
        ]
    return lines


def run_problems(result: Result, codes) -> list[str]:
    """What is wrong with a finished run expected to exit with one of `codes`.

    A failure status (2, 130, 143) must come with exactly one error line on
    stderr, the last message there (a message continued on a second line is
    not one line); no exit status may come with a traceback.
    """
    problems = []
    if result.timed_out:
        problems.append(f"{result.name}: no exit within {result.seconds:.0f} s (killed)")
    elif result.code not in codes:
        problems.append(
            f"{result.name}: exit {result.code}, expected "
            f"{' or '.join(map(str, codes))}{_last_line(result)}"
        )
    if "Traceback (most recent call last)" in result.stderr:
        problems.append(f"{result.name}: traceback on stderr{_last_line(result)}")
    if result.code in FAILURE_CODES and not result.timed_out:
        lines = message_lines(result.stderr)
        errors = [line for line in lines if _ERROR.match(line)]
        if len(errors) != 1:
            problems.append(
                f"{result.name}: {len(errors)} error lines on stderr, expected 1"
                f"{_last_line(result)}"
            )
        elif lines[-1] != errors[0]:
            problems.append(f"{result.name}: the error goes on past one line: {lines[-1]!r}")
    return problems


def did_work(result: Result) -> bool:
    """Whether a run got as far as the cache or training (what it prints on stdout)."""
    return bool(re.search(r"^(Bottleneck cache|Final test accuracy)", result.stdout, re.M))


def error_line(result: Result) -> str:
    errors = [line for line in message_lines(result.stderr) if _ERROR.match(line)]
    return errors[0] if errors else ""


def _last_line(result):
    lines = message_lines(result.stderr) or [""]
    return f" (stderr: {lines[-1][:200]!r})" if lines[-1] else ""


# -- snapshots ---------------------------------------------------------------


def digest(path, limit=None) -> str:
    """sha256 of a regular file, or of its first `limit` bytes plus its size."""
    with open(path, "rb") as file:
        if limit is None:
            return hashlib.file_digest(file, "sha256").hexdigest()
        head = hashlib.sha256(file.read(limit))
        head.update(str(os.fstat(file.fileno()).st_size).encode())
        return head.hexdigest()


def entry_state(path):
    """What one directory entry is, without following a symlink or opening a special file."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return ("symlink", os.readlink(path))
    if stat.S_ISDIR(info.st_mode):
        return ("folder",)
    if stat.S_ISREG(info.st_mode):
        return ("file", digest(path))
    return ("special", stat.S_IFMT(info.st_mode))


def tree(folder) -> dict | None:
    """{relative path: entry_state} of everything under `folder`; None if it does not exist."""
    folder = Path(folder)
    if not os.path.lexists(folder):
        return None
    if folder.is_symlink() or not folder.is_dir():
        return {".": entry_state(folder)}
    state = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root, name)
            state[str(path.relative_to(folder))] = entry_state(path)
    return state


def tree_problems(label: str, before, after) -> list[str]:
    """How `after` differs from `before` (tree snapshots of one folder), first few."""
    if before == after:
        return []
    if before is None or after is None:
        return [f"{label}: {'appeared' if before is None else 'disappeared'}"]
    changes = (
        [f"lost {p}" for p in sorted(before.keys() - after.keys())]
        + [f"changed {p}" for p in sorted(before) if p in after and before[p] != after[p]]
        + [f"added {p}" for p in sorted(after.keys() - before.keys())]
    )
    shown = ", ".join(changes[:4]) + (f" (+{len(changes) - 4} more)" if len(changes) > 4 else "")
    return [f"{label} changed: {shown}"]


def cache_rows(folder) -> dict:
    """{(cache file name, key): (relative path, vector bytes)} of every cached row.

    For each cache (a ``*.h5`` main file, its journal folder or its shard
    files, whichever exist) reads the main file, then finished shard files,
    then the journal (newest last, as a merge would). A main file that cannot
    be read, or whose datasets live in other files (external storage, virtual
    datasets), is left out: reading it would follow it elsewhere. Hidden
    files (a writer's temporaries) are not rows.
    """
    folder = Path(folder)
    names = {p.name for p in folder.glob("[!.]*.h5")}
    names |= {p.name.removesuffix(".journal") for p in folder.glob("[!.]*.h5.journal")}
    names |= {p.name.split(".shard-")[0] for p in folder.glob("[!.]*.h5.shard-*.npz")}
    rows = {}
    for name in sorted(names):
        for key, path, vector in main_rows(folder / name):
            rows[(name, key)] = (path, vector)
        extra = sorted(folder.glob(f"{glob.escape(name)}.shard-*.npz"))
        for npz in extra + sorted((folder / f"{name}.journal").glob("[0-9]*.npz")):
            try:
                with np.load(npz, allow_pickle=False) as archive:
                    for key, path, vector in zip(
                        archive["key"], archive["relative_path"], archive["bottleneck"]
                    ):
                        rows[(name, _text(key))] = (_text(path), vector.tobytes())
            except Exception:  # damaged: the run under test discards it
                pass
    return rows


def main_rows(main: Path) -> list:
    import h5py

    if not main.is_file():
        return []
    try:
        with h5py.File(main, "r") as file:
            images = file["images"]
            datasets = [images[name] for name in ("key", "relative_path", "bottleneck")]
            if any(d.external is not None or d.is_virtual for d in datasets):
                return []
            keys, paths, vectors = (d[()] for d in datasets)
    except Exception:  # a damaged main file: the run under test sets it aside
        return []
    return [(_text(k), _text(p), v.tobytes()) for k, p, v in zip(keys, paths, vectors)]


def _text(value):
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def rows_problems(before: dict, after: dict, exempt_paths=()) -> list[str]:
    """Rows of `before` missing from `after` or holding another vector there.

    Rows whose relative path is in `exempt_paths` (an image the case changed)
    are not compared.
    """
    lost = changed = 0
    for key, (path, vector) in before.items():
        if path in exempt_paths:
            continue
        if key not in after:
            lost += 1
        elif after[key][1] != vector:
            changed += 1
    problems = []
    if lost:
        problems.append(f"{lost} of {len(before)} cached rows lost")
    if changed:
        problems.append(f"{changed} cached rows hold another vector")
    return problems


def vectors_of(rows: dict, relative_path: str) -> list[np.ndarray]:
    return [
        np.frombuffer(vector, np.float16) for path, vector in rows.values() if path == relative_path
    ]


class Planted:
    """A user's files and folders: their content and modification time, checked later."""

    def __init__(self):
        self.entries = {}

    def file(self, path, data: bytes) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(PLANTED_MTIME_NS, PLANTED_MTIME_NS))
        return self.record(path)

    def record(self, path) -> Path:
        """Records an existing entry (a symlink as such, a folder by its tree)."""
        self.entries[Path(path)] = self._state(path)
        return Path(path)

    @staticmethod
    def _state(path):
        if not os.path.lexists(path):
            return None
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode):
            large = info.st_size > (16 << 20)  # e.g. the sparse 64 GB file: its head only
            return (
                "file",
                info.st_size,
                info.st_mtime_ns,
                digest(path, 1 << 20 if large else None),
            )
        if stat.S_ISDIR(info.st_mode):
            return ("folder", tuple(sorted(tree(path).items())))
        return (entry_state(path), info.st_mtime_ns)

    def problems(self) -> list[str]:
        found = []
        for path, state in self.entries.items():
            now = self._state(path)
            if now != state:
                what = "deleted" if now is None else "modified"
                found.append(f"user's {path.parent.name}/{path.name} {what}")
        return found


def python(*args) -> list:
    """A command line of this interpreter (the project's virtualenv when run from it)."""
    return [sys.executable, *args]


def mounts_under(folder: Path) -> list[str]:
    """Mount points at or below `folder` (from /proc/self/mounts), deepest first."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    prefix = str(folder.resolve())
    points = [line.split()[1].encode().decode("unicode_escape") for line in lines]
    return sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), reverse=True)
