"""The cases of benchmarks/hostile_check.py: what a case is, and the data-loss cases.

A case is a function ``case_<name>(ctx, case)``: it runs the tool through
``ctx`` (a Context: the work folder, its photo subsets, the warm cache) and
records what is wrong in ``case`` (a Case: one PASS/FAIL/SKIP line). It may
report more lines with ``ctx.case(name)``, and raises Skip when it cannot
run here (e.g. a tmpfs mount needs root).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import hostile_files as hf
import hostile_support as hs
from hostile_support import Planted, rows_problems, tree, tree_problems

RUN_TIMEOUT = 300.0


class Skip(Exception):
    """The case cannot run here; the message says why."""


class Case:
    """The problems one case found; ``line()`` is its PASS/FAIL/SKIP line."""

    def __init__(self, name: str):
        self.name, self.problems, self.notes, self.skipped = name, [], [], None
        self.last = None  # the last run checked with expect

    def expect(self, result: hs.Result, *codes: int) -> hs.Result:
        self.last = result
        self.problems += hs.run_problems(result, codes)
        said = hs.error_line(result) if result.code in hs.FAILURE_CODES else ""
        self.notes.append(
            f"{result.name} {result.describe()}" + (f" ({said[:90]!r})" if said else "")
        )
        return result

    def check(self, condition, problem: str) -> bool:
        if not condition:
            self.problems.append(problem)
        return bool(condition)

    def line(self) -> str:
        if self.skipped is not None:
            return f"SKIP {self.name}: {self.skipped}"
        if self.problems:
            return f"FAIL {self.name}: {'; '.join(self.problems)}"
        return f"PASS {self.name}: {', '.join(self.notes) or 'ok'}"


@dataclasses.dataclass
class Context:
    """The work folder, its image sets and the warm cache shared by cases that allow it."""

    work: Path
    source: Path
    classes: list  # the classes of the copied subsets
    classes_all: list  # every class of the source folder
    per_class: int
    extra: list = dataclasses.field(default_factory=list)  # further Case lines of the running case
    current: str = ""  # the running case's name (log file names)
    processes: list = dataclasses.field(default_factory=list)  # started by the running case
    baseline_seconds: float = 30.0
    baseline_peak_mb: float = 0.0
    full_cache_bytes: int = 0

    def __post_init__(self):
        self.photos, self.big = self.work / "photos", self.work / "big"
        self.cache, self.out, self.logs = self.work / "cache", self.work / "out", self.work / "logs"

    def case(self, name: str) -> Case:
        """Another result line reported by the running case."""
        self.extra.append(Case(name))
        return self.extra[-1]

    def start(self, name, args, env=None) -> hs.Process:
        self.processes.append(hs.Process(args, self.logs, name, env, log_prefix=self.current))
        return self.processes[-1]

    def stop_all(self) -> None:
        """Kills what a case left running (a case that stopped on an error of this script)."""
        for process in self.processes:
            if process.poll() is None:
                process.wait(0)
        self.processes = []

    def run(self, name, args, timeout=RUN_TIMEOUT, env=None) -> hs.Result:
        return self.start(name, args, env).wait(timeout)

    def retrain(self, name, image_dir, out, cache, *flags, timeout=RUN_TIMEOUT) -> hs.Result:
        return self.run(name, retrain_args(image_dir, out, cache, *flags), timeout)

    def first_photo(self, folder=None) -> Path:
        folder = folder or self.photos
        return sorted((folder / self.classes[0]).iterdir())[0]

    def clone(self, name: str) -> Path:
        return hf.clone(self.photos, self.work / name)


def retrain_args(image_dir, out, cache, *flags) -> list:
    return hs.python(
        "-m",
        "retrain",
        "--image_dir",
        image_dir,
        "--bottleneck_dir",
        cache,
        "--output_dir",
        out,
        *flags,
    )


def wait_for_journal(process: hs.Process, cache: Path, files: int, timeout=240.0) -> int:
    """Waits until the cache journal holds `files` batches; their count (0: the run ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = len(list(cache.glob("*.h5.journal/[0-9]*.npz")))
        if found >= files:
            return found
        time.sleep(0.02)
    return 0


def refused_up_front(case: Case, result: hs.Result) -> None:
    case.check(
        not hs.did_work(result),
        f"{result.name} was refused only after the work (it filled the cache or trained first)",
    )


def outputs_complete(case: Case, out: Path) -> None:
    """The last run exited 0: its output folder must hold a complete run."""
    if case.last is None or case.last.code != 0:
        return
    for name in ("model.keras", "labels.txt", "settings.yaml"):
        case.check((out / name).is_file(), f"{out.name}/{name} missing after exit 0")


def skipped_listed(case: Case, out: Path, *names: str) -> None:
    listing = out / "skipped_images.txt"
    text = listing.read_text(encoding="utf-8") if listing.is_file() else ""
    for name in names:
        case.check(name in text, f"{name} not listed in skipped_images.txt")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs mounted at `path` (created) for the block; Skip when it cannot be mounted."""
    if os.geteuid() != 0:
        raise Skip("needs root to mount a tmpfs")
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        raise Skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


# -- cases: data loss -------------------------------------------------------------------


def case_baseline(ctx: Context, case: Case) -> None:
    """A normal first run (cold cache): the outputs and the warm cache later cases reuse."""
    result = case.expect(ctx.retrain("baseline", ctx.photos, ctx.out, ctx.cache), 0)
    outputs_complete(case, ctx.out)
    rows = hs.cache_rows(ctx.cache)
    images = sum(1 for _ in ctx.photos.glob("*/*"))
    case.check(len(rows) == images, f"{len(rows)} cached rows for {images} images")
    ctx.baseline_seconds, ctx.baseline_peak_mb = result.seconds, result.peak_mb
    if (ctx.out / "model.keras").is_file():
        shutil.copytree(ctx.out, ctx.work / "finished", symlinks=True)


def case_cache_only_keeps_outputs(ctx: Context, case: Case) -> None:
    """--cache_only and a shard run after a normal run: the output folder is not touched."""
    before, beside = tree(ctx.out), {p.name for p in ctx.work.iterdir()}
    case.expect(ctx.retrain("cache_only", ctx.photos, ctx.out, ctx.cache, "--cache_only"), 0)
    fresh = ctx.work / "never_created"
    case.expect(
        ctx.retrain(
            "shard",
            ctx.photos,
            fresh,
            ctx.cache,
            "--cache_only",
            "--num_shards",
            "2",
            "--shard_index",
            "0",
        ),
        0,
    )
    case.problems += tree_problems("output folder", before, tree(ctx.out))
    case.check(not os.path.lexists(fresh), "--cache_only created the output folder")
    new = {p.name for p in ctx.work.iterdir()} - beside - {"never_created"}
    case.check(
        not {n for n in new if not n.endswith(".lock")},
        f"new entries beside the output folder: {sorted(new)}",
    )


def _interrupt(ctx, case, name, sig, out, cache, group):
    """Starts a cold run on the big set, sends `sig` mid-extraction; the rows it kept."""
    process = ctx.start(name, retrain_args(ctx.big, out, cache, "--extraction_batch_size", "8"))
    journal = wait_for_journal(process, cache, 2)
    if not case.check(journal, f"{name}: the run ended before extraction could be interrupted"):
        case.expect(process.wait(RUN_TIMEOUT), 0)
        return None
    process.signal(sig, group=group)
    case.expect(process.wait(120), 130 if sig == signal.SIGINT else 143)
    kept = hs.cache_rows(cache)
    case.check(
        len(kept) >= 8 * journal,
        f"{len(kept)} rows kept, {8 * journal} were journalled before the signal",
    )
    case.notes.append(f"{len(kept)} rows kept")
    return kept


def case_sigint_resume(ctx: Context, case: Case) -> None:
    """Ctrl-C mid-extraction into a finished output folder: 130, outputs kept; rerun resumes."""
    cache, before = ctx.work / "cache_sigint", tree(ctx.out)
    kept = _interrupt(ctx, case, "ctrl-c", signal.SIGINT, ctx.out, cache, group=True)
    case.problems += tree_problems("output folder after Ctrl-C", before, tree(ctx.out))
    if kept is None:
        return
    result = case.expect(ctx.retrain("resume", ctx.big, ctx.out, cache), 0)
    after = hs.cache_rows(cache)
    case.problems += rows_problems(kept, after)
    reused = re.search(r"(\d+) reused", result.stdout)
    case.check(
        reused is None or int(reused.group(1)) >= len(kept),
        f"the resumed run reused {reused and reused.group(1)} of {len(kept)} kept rows",
    )
    outputs_complete(case, ctx.out)
    images = sum(1 for _ in ctx.big.glob("*/*"))
    main = sorted(cache.glob("[!.]*.h5"))
    if len(after) == images and main:
        ctx.full_cache_bytes = main[0].stat().st_size


def case_sigterm(ctx: Context, case: Case) -> None:
    """SIGTERM mid-extraction (docker stop): 143, no output folder, rows kept; rerun completes."""
    cache, out = ctx.work / "cache_sigterm", ctx.work / "out_sigterm"
    kept = _interrupt(ctx, case, "sigterm", signal.SIGTERM, out, cache, group=False)
    case.check(not os.path.lexists(out), "SIGTERM left an output folder")
    left = [p.name for p in ctx.work.glob(".out_sigterm.staging*")]
    case.check(not left, f"SIGTERM left {left}")
    if kept is not None:
        case.expect(ctx.retrain("resume", ctx.big, out, cache, "--cache_only"), 0)
        case.problems += rows_problems(kept, hs.cache_rows(cache))


def case_disk_full_cache(ctx: Context, case: Case) -> None:
    """A full disk under the cache: exit 2, rows kept; with space back the next run completes."""
    out = ctx.work / "out_full"
    with tmpfs(ctx.work / "cache_full", "384k") as cache:
        result = case.expect(
            ctx.retrain("disk-full", ctx.big, out, cache, "--extraction_batch_size", "8"), 2
        )
        case.check(
            re.search(r"space|full", hs.error_line(result), re.I),
            "the error line does not say the disk is full",
        )
        case.check(not os.path.lexists(out), "the failed run left an output folder")
        kept = hs.cache_rows(cache)
        case.check(kept, "no row kept from the run that filled the disk")
        # Space back: room for the merged file 1.5 times over (issue 21's bound).
        images = sum(1 for _ in ctx.big.glob("*/*"))
        final = ctx.full_cache_bytes or images * 1280 * 2 + (256 << 10)
        usage = os.statvfs(cache)
        used = (usage.f_blocks - usage.f_bfree) * usage.f_frsize
        size_kb = (used + int(1.5 * final)) // 1024 + 128
        subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(cache)], check=True)
        case.notes.append(f"{len(kept)} rows kept, space back to {size_kb} KB")
        case.expect(ctx.retrain("space-back", ctx.big, out, cache), 0)
        after = hs.cache_rows(cache)
        case.problems += rows_problems(kept, after)
        case.check(len(after) == images, f"{len(after)} cached rows for {images} images")
        outputs_complete(case, out)


def case_two_runs_one_folder(ctx: Context, case: Case) -> None:
    """A second run into a folder in use exits 2 saying so; the first completes."""
    out, cache = ctx.work / "out_two", ctx.work / "cache_two"
    first = ctx.start("first", retrain_args(ctx.big, out, cache, "--extraction_batch_size", "8"))
    if not case.check(wait_for_journal(first, cache, 1), "the first run ended before the second"):
        first.wait(RUN_TIMEOUT)
        return
    second = case.expect(ctx.retrain("second", ctx.photos, out, ctx.cache), 2)
    case.check(first.poll() is None, "the first run ended before the second was refused")
    case.check("in use" in hs.error_line(second), "the error does not say the folder is in use")
    case.expect(first.wait(RUN_TIMEOUT), 0)
    outputs_complete(case, out)
    record = out / "run_record.json"
    if record.is_file():
        image_dir = json.loads(record.read_text(encoding="utf-8")).get("image_dir", "")
        case.check(Path(image_dir).name == "big", f"the output folder holds {image_dir}'s run")


def case_user_file_in_output(ctx: Context, case: Case) -> None:
    """A user's files added to a retrain output folder: carried over, or the run refuses."""
    planted = Planted()
    planted.file(ctx.out / "keep.txt", b"precious\n")
    planted.file(ctx.out / "mine" / "notes.txt", b"my notes\n")
    before = tree(ctx.out)
    result = case.expect(ctx.retrain("rerun", ctx.photos, ctx.out, ctx.cache), 0, 2)
    case.problems += planted.problems()
    if result.code == 2:
        refused_up_front(case, result)
        case.problems += tree_problems("refused run's output folder", before, tree(ctx.out))
    else:
        outputs_complete(case, ctx.out)


def case_foreign_settings_yaml(ctx: Context, case: Case) -> None:
    """A folder with someone else's settings.yaml is not retrain's: nothing in it is lost."""
    folder, planted = ctx.work / "p", Planted()
    planted.file(folder / "settings.yaml", b"x: 1\n")
    planted.file(folder / "keep.txt", b"precious\n")
    before = tree(folder)
    result = case.expect(ctx.retrain("run", ctx.photos, folder, ctx.cache), 0, 2)
    case.problems += planted.problems()
    if result.code == 2:
        refused_up_front(case, result)
        case.problems += tree_problems("refused run's --output_dir", before, tree(folder))


def case_staging_names(ctx: Context, case: Case) -> None:
    """--output_dir 'exp?': no other folder's staging, and no user's folder, is removed."""
    planted, lookalike = Planted(), Planted()
    planted.file(ctx.work / "exp1" / "result.txt", b"exp1's result\n")
    planted.file(ctx.work / ".exp1.staging-123" / "user.txt", b"a user's file\n")
    lookalike.file(ctx.work / ".exp?.staging-99999" / "user.txt", b"a user's file\n")
    out = ctx.work / "exp?"
    case.expect(ctx.retrain("run", ctx.photos, out, ctx.cache), 0)
    outputs_complete(case, out)
    case.problems += planted.problems()
    second = ctx.case("staging_lookalike")
    second.notes.append("a user's folder named .exp?.staging-99999 kept")
    second.problems += lookalike.problems()


def case_output_under_file(ctx: Context, case: Case) -> None:
    """--output_dir below a regular file: exit 2, one line, the file untouched."""
    planted = Planted()
    a_file = planted.file(ctx.work / "a_file", b"not a folder\n")
    refused_up_front(
        case, case.expect(ctx.retrain("run", ctx.photos, a_file / "out", ctx.cache), 2)
    )
    case.problems += planted.problems()


def case_output_on_mount(ctx: Context, case: Case) -> None:
    """--output_dir a mount point: works (twice: the second swaps) or is refused up front."""
    with tmpfs(ctx.work / "mnt_out", "256m") as mount:
        first = case.expect(ctx.retrain("first", ctx.photos, mount, ctx.cache), 0, 2)
        if first.code == 2:
            refused_up_front(case, first)
            case.check(tree(mount) == {}, "the refused run left files in the mount point")
            case.notes.append("refused up front")
        else:
            outputs_complete(case, mount)
            before = tree(mount)
            second = case.expect(ctx.retrain("second", ctx.photos, mount, ctx.cache), 0)
            if second.code == 0:
                outputs_complete(case, mount)
            else:
                case.problems += tree_problems("mount point", before, tree(mount))
        case.check(os.path.ismount(mount), "the mount point is no longer mounted there")


def case_sigkill_output(ctx: Context, case: Case) -> None:
    """SIGKILL at random moments of a run into a finished folder: the old run or the new, whole."""
    out, rng = ctx.work / "out_kill", random.Random(21)
    first = case.expect(ctx.retrain("first", ctx.photos, out, ctx.cache), 0)
    outputs_complete(case, out)
    for attempt in range(3):
        before = tree(out)
        process = ctx.start(f"kill{attempt}", retrain_args(ctx.photos, out, ctx.cache))
        moment = rng.uniform(0.5, first.seconds)
        while process.poll() is None and time.monotonic() - process.started < moment:
            time.sleep(0.02)
        process.signal(signal.SIGKILL)
        killed = process.wait(60)
        case.notes.append(f"killed at {moment:.1f} s" if killed.code == -9 else "ended first")
        if tree(out) != before:  # the new run was swapped in: it must be whole
            for name in ("model.keras", "labels.txt", "settings.yaml", "run_record.json"):
                case.check(
                    (out / name).is_file(), f"after SIGKILL at {moment:.1f} s, {name} missing"
                )
    case.expect(ctx.retrain("after", ctx.photos, out, ctx.cache), 0)
    outputs_complete(case, out)
    left = [p.name for p in ctx.work.glob(".out_kill.staging*")]
    case.check(not left, f"the run after the kills left {left}")
