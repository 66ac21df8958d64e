"""Start-up time of the commands: what a user waits for before any work starts.

    python benchmarks/startup.py [--repeats 5] [--source DIR ...] [--work_dir DIR]

Each figure is the median wall time, in seconds, of REPEATS runs of a real
command in a fresh process: `python -m retrain --help`, a usage error,
`import retrain.run`, `retrain.label_image` on one picture (the model of a
tiny run on 40 of scikit-learn's digits, written once), and warm reruns of
that tiny run: `--cache_only` (start-up, discovery and the cache check only)
and a full training rerun. Then the 15 largest cumulative imports of a warm
training rerun, from `python -X importtime`.

--source compares source trees (e.g. an older commit unpacked with
`git archive COMMIT retrain | tar -x -C /tmp/before`): runs are interleaved
across them, so load from other processes spreads over all columns alike.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
from make_digits import write_digits  # noqa: E402  (examples/ is not a package)

TINY_RUN = ("--how_many_training_steps", "50", "--seed", "0")


def commands(work: Path) -> dict[str, list[str]]:
    """Name -> argv after `python`, each run in `work`."""
    run = ["-m", "retrain", "--image_dir", "digits", "--bottleneck_dir", "cache", *TINY_RUN]
    return {
        "--help": ["-m", "retrain", "--help"],
        "usage error": ["-m", "retrain", "--image_dir", "digits", "--no_such_flag"],
        "import retrain.run": ["-c", "import retrain.run"],
        "label_image, 1 picture": [
            "-m",
            "retrain.label_image",
            "--graph",
            "model/model.keras",
            "--labels",
            "model/labels.txt",
            "--image",
            "digits/3/digit_0003.png",
        ],
        "warm rerun, --cache_only": [*run, "--cache_only"],
        "warm rerun, training": [*run, "--output_dir", "rerun"],
    }


def run_python(source: Path, argv: list[str], work: Path) -> subprocess.CompletedProcess:
    """`python ARGV` in `work` with `source`'s retrain package first on the path."""
    environment = dict(os.environ, PYTHONPATH=str(source))
    return subprocess.run(
        [sys.executable, *argv], cwd=work, env=environment, capture_output=True, text=True
    )


def prepare(work: Path, source: Path) -> None:
    """The tiny run's images, its filled cache and its model (once)."""
    if not (work / "digits").exists():
        write_digits(work / "digits", per_class=4)
    if not (work / "model" / "model.keras").exists():
        argv = ["-m", "retrain", "--image_dir", "digits", "--bottleneck_dir", "cache"]
        result = run_python(source, [*argv, *TINY_RUN, "--output_dir", "model"], work)
        if result.returncode != 0:
            sys.exit(f"the tiny run failed:\n{result.stderr[-3000:]}")


def timed(source: Path, argv: list[str], work: Path, expected: set[int]) -> float:
    started = time.perf_counter()
    result = run_python(source, argv, work)
    seconds = time.perf_counter() - started
    if result.returncode not in expected:
        sys.exit(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return seconds


def medians(sources: list[Path], work: Path, repeats: int) -> dict[str, list[float]]:
    """Name -> the median seconds of each source, runs interleaved across sources."""
    times = {name: [[] for _ in sources] for name in commands(work)}
    for _ in range(repeats):
        for name, argv in commands(work).items():
            expected = {2} if name == "usage error" else {0}
            for column, source in enumerate(sources):
                times[name][column].append(timed(source, argv, work, expected))
    return {name: [statistics.median(t) for t in columns] for name, columns in times.items()}


def top_imports(source: Path, work: Path, count: int = 15) -> list[tuple[float, str]]:
    """The `count` largest cumulative import times (ms, module) of a warm training rerun;
    a module nested in a listed one counts too, as -X importtime prints it."""
    argv = commands(work)["warm rerun, training"]
    stderr = run_python(source, ["-X", "importtime", *argv], work).stderr
    found = []
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            found.append((int(match.group(1)) / 1000, match.group(3)))
    return sorted(found, reverse=True)[:count]


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    parser.add_argument(
        "--source", nargs="+", default=[str(REPO)], help="source trees holding retrain/"
    )
    parser.add_argument("--work_dir", default="output/bench_startup", help="scratch folder")
    parser.add_argument("--fresh", action="store_true", help="remove --work_dir first")
    args = parser.parse_args(argv)
    sources = [Path(source).resolve() for source in args.source]
    work = Path(args.work_dir).resolve()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, sources[0])
    figures = medians(sources, work, args.repeats)
    print(f"{cpu_model()}, {os.cpu_count()} cores; median of {args.repeats} runs, seconds")
    print(f"| {'command':<26} | " + " | ".join(f"{s.name:>12}" for s in sources) + " |")
    print(f"|{'-' * 28}|" + "|".join("-" * 14 for _ in sources) + "|")
    for name, values in figures.items():
        print(f"| {name:<26} | " + " | ".join(f"{v:>12.2f}" for v in values) + " |")
    for source in sources:
        print(f"\n{source.name}: largest cumulative imports of a warm training rerun (ms)")
        for milliseconds, module in top_imports(source, work):
            print(f"{milliseconds:10.1f}  {module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
