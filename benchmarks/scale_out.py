"""Scale-out check: sharded and Beam cache fills against a single-process run.

    python benchmarks/scale_out.py [--data FOLDER] [--classes 17] [--per_class 80]

On a sample of real photos (the ``--classes`` largest classes of
../shared/data/caltech101/train by default, at most ``--per_class`` each,
copied to a temporary folder) it runs, as separate processes, timing each:

1. the reference: ``python -m retrain`` on a cold cache;
2. ``python -m retrain --cache_only`` on a cold cache (single-process fill);
3. two ``--cache_only --num_shards 2 --shard_index I`` processes at once,
   then a normal run on that cache;
4. ``python -m retrain.beam`` on the DirectRunner with 2 worker processes
   (multi_processing), then a normal run on that cache.

It prints the fill rates (images/s, wall clock including start-up), each
normal run's time as a fraction of the reference run's, whether its test
accuracy equals the reference's, and whether its cache holds the reference
cache's keys and vectors bit for bit.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101" / "train"
BEAM = [
    "--runner",
    "DirectRunner",
    "--direct_num_workers",
    "2",
    "--direct_running_mode",
    "multi_processing",
]


def sample(data, classes, per_class, into):
    """Copies (keeping mtimes) the largest classes, at most per_class photos each."""
    sizes = {
        c.name: sorted(p for p in c.iterdir() if p.is_file()) for c in data.iterdir() if c.is_dir()
    }
    chosen = sorted(sizes, key=lambda name: (-len(sizes[name]), name))[:classes]
    count = 0
    for name in chosen:
        (into / name).mkdir(parents=True)
        for path in sizes[name][:per_class]:
            shutil.copy2(path, into / name / path.name)
            count += 1
    return count, len(chosen)


def timed(*commands):
    """Runs the commands at once; returns the wall seconds until all have ended."""
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    start = time.perf_counter()
    processes = [
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        for command, log in zip(commands, logs)
    ]
    for process in processes:
        process.wait()
    seconds = time.perf_counter() - start
    for command, process, log in zip(commands, processes, logs):
        if process.returncode != 0:
            log.seek(0)
            sys.exit(f"failed ({process.returncode}): {' '.join(command)}\n{log.read()[-3000:]}")
    return seconds


def retrain(image_dir, cache, output, *flags):
    return [
        sys.executable,
        "-m",
        "retrain",
        "--image_dir",
        str(image_dir),
        "--bottleneck_dir",
        str(cache),
        "--output_dir",
        str(output),
        *flags,
    ]


def accuracy(output):
    return json.loads((output / "metrics.json").read_text())["accuracy"]


def rows(cache):
    """{key: vector bytes} of the one cache file in ``cache``."""
    (path,) = cache.glob("*.h5")
    with h5py.File(path, "r") as file:
        keys = file["images/key"][()]
        vectors = file["images/bottleneck"][()]
    return {key: vector.tobytes() for key, vector in zip(keys, vectors)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder with one sub-folder of photos per class",
    )
    parser.add_argument("--classes", type=int, default=17)
    parser.add_argument("--per_class", type=int, default=80)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"No photos: {args.data} is absent. Pass --data FOLDER.", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        photos = work / "photos"
        count, classes = sample(args.data, args.classes, args.per_class, photos)
        print(
            f"{count} photos in {classes} classes from {args.data}; {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f} at the start"
        )

        reference = timed(retrain(photos, work / "ref", work / "ref_out"))
        reference_accuracy, reference_rows = accuracy(work / "ref_out"), rows(work / "ref")
        print(
            f"reference run, cold cache: {reference:6.1f} s, test accuracy {reference_accuracy:.4f}"
        )
        single = timed(retrain(photos, work / "single", work / "single_out", "--cache_only"))
        print(
            f"single-process fill (--cache_only):        {single:6.1f} s, "
            f"{count / single:5.1f} images/s"
        )

        fills = {
            "2 shard processes at once": [
                retrain(
                    photos,
                    work / "shards",
                    work / f"shard{index}_out",
                    "--cache_only",
                    "--num_shards",
                    "2",
                    "--shard_index",
                    str(index),
                )
                for index in range(2)
            ],
            "Beam DirectRunner, 2 worker processes": [
                [
                    sys.executable,
                    "-m",
                    "retrain.beam",
                    "--image_dir",
                    str(photos),
                    "--bottleneck_dir",
                    str(work / "beam"),
                    *BEAM,
                ]
            ],
        }
        for (name, commands), cache in zip(fills.items(), ("shards", "beam")):
            fill = timed(*commands)
            run = timed(retrain(photos, work / cache, work / f"{cache}_run"))
            same_accuracy = accuracy(work / f"{cache}_run") == reference_accuracy
            same_rows = rows(work / cache) == reference_rows
            print(
                f"{name + ' (fill):':42s} {fill:6.1f} s, {count / fill:5.1f} images/s "
                f"({single / fill:4.2f}x single-process); then a normal run {run:5.1f} s = "
                f"{run / reference:4.2f} of the reference; same test accuracy: "
                f"{same_accuracy}; same keys and vectors: {same_rows}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
