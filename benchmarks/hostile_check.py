"""End-to-end hostile-input check (issue 21): every case through the real command line.

    .venv/bin/python benchmarks/hostile_check.py [--image_dir DIR] [--work_dir DIR]
        [--only CASE,CASE] [--keep_work_dir]

Copies a small subset of real photos (default ``../shared/data/flowers128``,
3 classes x 30 photos, plus 3 x 100 for the runs that are interrupted) into
a work folder, then runs ``python -m retrain``, ``python -m
retrain.label_image`` and ``python -m retrain.report`` as a user would, in
subprocesses with timeouts, once per case: the data-loss and untrusted-input
cases of issue 21 and the earlier ones (Ctrl-C and resume, SIGTERM, disk
full then space back, an output folder under a file, a decompression bomb,
a truncated cache, hard class names, two runs into one folder).

For every case it checks the documented exit status (0, 2, 130 or 143), no
traceback on stderr, an error of exactly one line, the previous outputs
intact (every file of the output folder hashed before and after), the cached
rows intact (every row of the cache read with h5py before and after: same
key, same vector, unless the case changed that image) and nobody's file
touched (planted user files and symlink targets: bytes and modification
times). It prints ``PASS|FAIL|SKIP <case>: <detail>`` per case, then ``N
passed, N failed``; exit status 1 if any case failed, 2 for a bad argument.

Safety: it writes only inside its work folder (a new temporary folder by
default; a folder given with --work_dir must be empty or one this script
made), and as root mounts tmpfs file systems inside it, which it unmounts.
The cases that need a mount are skipped when not root. Runs take about
10 minutes on 2 cores.

The cases are in hostile_cases.py (data loss) and hostile_inputs.py (names,
untrusted files); running processes and snapshots in hostile_support.py; the
crafted files in hostile_files.py.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import hostile_cases as cases
import hostile_files as hf
import hostile_inputs as inputs
import hostile_support as hs
from hostile_cases import Case, Context, Skip
from hostile_support import rows_problems, tree, tree_problems

WORK_MARKER = ".hostile_check"

# -- the runner --------------------------------------------------------------------------

CASES = [
    ("baseline", cases.case_baseline),
    ("cache_only_keeps_outputs", cases.case_cache_only_keeps_outputs),
    ("sigint_resume", cases.case_sigint_resume),
    ("sigterm", cases.case_sigterm),
    ("disk_full_cache", cases.case_disk_full_cache),
    ("two_runs_one_folder", cases.case_two_runs_one_folder),
    ("user_file_in_output", cases.case_user_file_in_output),
    ("foreign_settings_yaml", cases.case_foreign_settings_yaml),
    ("staging_glob", cases.case_staging_names),
    ("output_under_file", cases.case_output_under_file),
    ("output_on_mount", cases.case_output_on_mount),
    ("sigkill_output", cases.case_sigkill_output),
    ("non_utf8_name", inputs.case_non_utf8_name),
    ("hard_class_names", inputs.case_hard_class_names),
    ("special_files", inputs.case_special_files),
    ("sparse_64gb", inputs.case_sparse_64gb),
    ("decompression_bomb", inputs.case_decompression_bomb),
    ("truncated_cache", inputs.case_truncated_cache),
    ("external_storage_cache", inputs.case_external_storage_cache),
    ("npz_bomb", inputs.case_npz_bomb),
    ("lock_symlinks", inputs.case_lock_symlinks),
    ("shared_cache_collision", inputs.case_shared_cache_collision),
    ("label_image_legacy_h5_lambda", inputs.case_label_image_untrusted),
    ("received_report", inputs.case_received_report),
]


def run_case(ctx: Context, name: str, function) -> list[Case]:
    """Runs one case; its lines. Rows of the shared warm cache must survive every case."""
    case, ctx.extra, ctx.current = Case(name), [], name
    rows = hs.cache_rows(ctx.cache)
    try:
        function(ctx, case)
    except Skip as reason:
        case.skipped = str(reason)
    except Exception as error:  # a bug of this script: a failure, with its traceback logged
        with open(ctx.logs / "script_errors.txt", "a") as log:
            log.write(f"{name}:\n{traceback.format_exc()}\n")
        case.problems.append(
            f"hostile_check error: {type(error).__name__}: {error} "
            f"(see {ctx.logs / 'script_errors.txt'})"
        )
    finally:
        ctx.stop_all()
    case.problems += [f"shared cache: {p}" for p in rows_problems(rows, hs.cache_rows(ctx.cache))]
    return [case] + ctx.extra


def usage_error(message: str) -> None:
    """One line on stderr and exit status 2, as the tool itself does."""
    print(f"hostile_check: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def prepare_work(path: Path | None) -> Path:
    """The work folder: new, empty, or one this script made (then emptied)."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix="hostile-check-"))
    path = path.resolve()
    if path.exists() and any(path.iterdir()):
        if not (path / WORK_MARKER).exists():
            usage_error(
                f"--work_dir {path} is not empty and was not made by this script; "
                "give a new or empty folder"
            )
        for point in hs.mounts_under(path):
            subprocess.run(["umount", point], capture_output=True)
        for entry in path.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / WORK_MARKER).write_text("made by benchmarks/hostile_check.py\n")
    return path


def build_context(args, work: Path) -> Context:
    source = args.image_dir.resolve()
    classes_all = sorted(
        p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if len(classes_all) < 2:
        usage_error(f"--image_dir {source} needs 2 or more class folders of photos")
    ctx = Context(work, source, classes_all[: args.classes], classes_all, args.per_class)
    ctx.logs.mkdir()
    chosen = {name: name for name in ctx.classes}
    hf.copy_images(source, ctx.photos, chosen, 0, args.per_class)
    hf.copy_images(source, ctx.big, chosen, args.per_class + 20, 100)
    return ctx


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--image_dir",
        type=Path,
        default=hs.REPO.parent / "shared/data/flowers128",
        help="folder of class folders of photos to copy a subset from",
    )
    parser.add_argument("--work_dir", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--keep_work_dir", action="store_true", help="keep the work folder")
    parser.add_argument("--classes", type=int, default=3, help="classes copied (default 3)")
    parser.add_argument("--per_class", type=int, default=30, help="photos per class (default 30)")
    parser.add_argument("--only", help="comma-separated case names (the baseline always runs)")
    args = parser.parse_args(argv)
    known = {name for name, _ in CASES}
    wanted = set(args.only.split(",")) if args.only else known
    if wanted - known:
        parser.error(f"unknown cases {sorted(wanted - known)}; known: {', '.join(sorted(known))}")
    args.cases = [(n, f) for n, f in CASES if n in wanted or n == "baseline"]
    if not args.image_dir.is_dir():
        usage_error(f"--image_dir {args.image_dir} is not a folder; give a folder of class folders")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = prepare_work(args.work_dir)
    lines = []
    try:
        ctx = build_context(args, work)
        before = {folder: tree(folder) for folder in (ctx.photos, ctx.big)}
        print(f"work folder {work}; logs in {ctx.logs}", flush=True)
        for name, function in args.cases:
            for case in run_case(ctx, name, function):
                lines.append(case.line())
                print(lines[-1], flush=True)
        untouched = Case("image_folders_untouched")
        untouched.notes.append("every photo byte-identical")
        for folder, state in before.items():
            untouched.problems += tree_problems(folder.name, state, tree(folder))
        lines.append(untouched.line())
        print(lines[-1])
    finally:
        for point in hs.mounts_under(work):
            subprocess.run(["umount", point], capture_output=True)
        if args.work_dir is None and not args.keep_work_dir:
            shutil.rmtree(work, ignore_errors=True)
    passed, failed = (sum(line.startswith(k) for line in lines) for k in ("PASS", "FAIL"))
    print(f"{passed} passed, {failed} failed ({len(lines) - passed - failed} skipped)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
