"""Peak memory of training on the bottleneck cache, against the cache's size.

    python benchmarks/cache_memory.py [--rows 2000000] [--folder DIR] [--steps 2000]
    python benchmarks/cache_memory.py --whole_run [--rows 400000] [--folder DIR]

Writes (once) a synthetic cache of --rows EfficientNet-Lite0-shaped float16
vectors in the real format (through the cache's own journal and fold), ten
classes of noisy cluster centres, then trains the head on it in a fresh
process for a small and the full share of its rows and prints each child's
peak resident memory (VmHWM, reset after start-up). Training streams the cache block by block
through a bounded shuffle buffer, so peak memory must stay flat while the
vectors grow far past it; what does grow is the cache's index (keys and file
states, loaded whole) and the image list.

With --whole_run it runs `python -m retrain` itself (defaults: report,
data checks, export) on a quarter and on all of the rows, each row an image
file stub that the cache already holds (so nothing is decoded), and prints
each run's peak resident memory: the vectors are never all in memory there
either, only the image list grows.

Also imported by tests/test_cache_memory.py for `write_synthetic_cache` and
`train_child`.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FEATURE_DIM = 1280
CLASSES = 10
BLOCK = 16384


def entries(rows, validation_every=50):
    """ImageEntry objects of the synthetic rows: class = row % CLASSES."""
    from retrain.data.images import ImageEntry, cache_key

    result = []
    for row in range(rows):
        path = f"class{row % CLASSES}/{row}.png"
        bucket = "validation" if row % validation_every == 0 else "training"
        result.append(
            ImageEntry(path, f"class{row % CLASSES}", row % CLASSES, bucket, cache_key(path))
        )
    return result


def write_synthetic_cache(folder, rows, seed=0):
    """A Lite0 cache in `folder` with `rows` rows; returns its path. Kept if already complete."""
    from retrain.cache import BottleneckCache, merge
    from retrain.cache.journal import Journal, Records

    cache = BottleneckCache(folder, "efficientnet_lite0")
    done = Path(f"{cache.path}.rows")
    if cache.path.exists() and done.exists() and int(done.read_text()) == rows:
        return cache.path
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (CLASSES, FEATURE_DIM)).astype(np.float32)
    journal = Journal(cache.path, cache.identity)
    all_entries = entries(rows)
    for start in range(0, rows, BLOCK):
        block = all_entries[start : start + BLOCK]
        labels = np.array([entry.label_index for entry in block])
        records = Records(
            key=[entry.key for entry in block],
            relative_path=[entry.relative_path for entry in block],
            size=[1000] * len(block),
            mtime_ns=[0] * len(block),
            sha256=["0" * 64] * len(block),
            bottleneck=(centres[labels] + rng.normal(0, 2, (len(block), FEATURE_DIM))).astype(
                np.float16
            ),
        )
        journal.append(records)
    merge.fold(cache.path, cache.identity)
    done.write_text(str(rows))
    return cache.path


# What write_synthetic_cache records of every row's file.
STUB_SIZE = 1000
STUB_MTIME_NS = 0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_image_stubs(folder, rows):
    """Files for the first `rows` synthetic rows under folder/classK/ROW.png; returns folder.

    Each starts with a PNG signature (discovery accepts it) and has the size
    and mtime the cache records, so a run finds its vector cached and never
    decodes it. Kept if already complete.
    """
    folder = Path(folder)
    done = folder / ".rows"
    if done.exists() and int(done.read_text()) == rows:
        return folder
    stub = PNG_SIGNATURE.ljust(STUB_SIZE, b"\0")
    for entry in entries(rows):
        path = folder / entry.relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(stub)
        os.utime(path, ns=(STUB_MTIME_NS, STUB_MTIME_NS))
    done.write_text(str(rows))
    return folder


def whole_run_child(image_dir, cache_folder, output_dir, extra=()):
    """`python -m retrain` with default settings (but the engine) in a fresh process: its report dict.

    peak_rss_mb: the process's peak resident memory (wait4's ru_maxrss).
    """
    root = Path(__file__).resolve().parents[1]
    # --engine keras: the engine the synthetic cache is written as (nothing is extracted).
    command = [
        sys.executable,
        "-m",
        "retrain",
        "--image_dir",
        str(image_dir),
        "--bottleneck_dir",
        str(cache_folder),
        "--output_dir",
        str(output_dir),
        "--engine",
        "keras",
        *extra,
    ]
    start = time.perf_counter()
    with open(Path(output_dir).parent / f"{Path(output_dir).name}.log", "w") as log:
        child = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"retrain failed: see {log.name}")
    text = Path(log.name).read_text(errors="replace")
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "cache_line": next(
            (line for line in text.splitlines() if line.startswith("Bottleneck cache")), ""
        ),
        "checks_line": next(
            (line for line in text.splitlines() if line.startswith("Data checks")), ""
        ),
    }


def train_child(folder, rows, steps, batch_size=256, shuffle_buffer=None):
    """Trains the head on the first `rows` rows in a fresh process; returns its report dict.

    The child prints JSON: rows, seconds, peak_rss_mb (VmHWM, reset just
    before training), baseline_rss_mb (resident memory just before training: after
    importing TensorFlow and building the image list), validation accuracy;
    their difference is what training on the cache costs.
    """
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--folder",
        str(folder),
        "--rows",
        str(rows),
        "--steps",
        str(steps),
        "--batch_size",
        str(batch_size),
    ]
    if shuffle_buffer:
        command += ["--shuffle_buffer", str(shuffle_buffer)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    if done.returncode:
        raise RuntimeError(f"training child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(args):
    from retrain.quiet_tensorflow import import_tensorflow

    import_tensorflow()
    from retrain.cache import BottleneckCache
    from retrain.training import datasets
    from retrain.training.head import fit_head
    from retrain.training.settings import HeadSettings

    def status_mb(field):
        # Linux: /proc/self/status holds VmRSS (now) and VmHWM (peak) in kB.
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    chosen = entries(args.rows)
    training = [e for e in chosen if e.split_bucket == "training"]
    validation = [e for e in chosen if e.split_bucket == "validation"][:2000]
    cache = BottleneckCache(args.folder, "efficientnet_lite0")
    # Forget the peak of start-up (importing TensorFlow), so the peak measured
    # after training is training's own (Linux: clear_refs 5 resets VmHWM).
    Path("/proc/self/clear_refs").write_text("5")
    baseline = status_mb("VmRSS")
    start = time.perf_counter()
    buffer = args.shuffle_buffer or datasets.SHUFFLE_BUFFER
    result = fit_head(
        datasets.cached_training(cache, training, args.batch_size, 0, shuffle_buffer=buffer),
        datasets.cached_sample(cache, validation, -1, 0),
        HeadSettings(
            how_many_training_steps=args.steps,
            learning_rate=0.003,
            train_batch_size=args.batch_size,
            eval_step_interval=100,
            seed=0,
            progress=False,
        ),
        feature_dim=FEATURE_DIM,
        num_classes=CLASSES,
        train_count=len(training),
    )
    print(
        json.dumps(
            {
                "rows": args.rows,
                "seconds": round(time.perf_counter() - start, 1),
                "baseline_rss_mb": round(baseline),
                "peak_rss_mb": round(status_mb("VmHWM")),
                "val_accuracy": result.history[-1]["val_accuracy"],
                "images_seen": args.steps * args.batch_size,
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--folder", default="benchmarks/.cache_memory")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--shuffle_buffer", type=int, default=None)
    parser.add_argument(
        "--whole_run",
        action="store_true",
        help="run python -m retrain on file stubs instead of training alone",
    )
    parser.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="with --whole_run: the runs skip the report and data checks",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    start = time.perf_counter()
    path = write_synthetic_cache(args.folder, args.rows)
    print(
        f"synthetic cache {path}: {args.rows:,} rows, {path.stat().st_size / 2**30:.2f} GiB "
        f"on disk ({args.rows * FEATURE_DIM * 4 / 2**30:.2f} GiB as float32), "
        f"written in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    if args.whole_run:
        return _whole_runs(args)
    print(
        "rows       vectors(float32)  RSS before training  peak RSS  peak - before  seconds  val_accuracy"
    )
    for rows in (args.rows // 16, args.rows // 4, args.rows):
        report = train_child(args.folder, rows, args.steps, args.batch_size, args.shuffle_buffer)
        print(
            f"{rows:>9,}  {rows * FEATURE_DIM * 4 / 2**20:>12,.0f} MB  "
            f"{report['baseline_rss_mb']:>16,} MB  {report['peak_rss_mb']:>6,} MB  "
            f"{report['peak_rss_mb'] - report['baseline_rss_mb']:>10,} MB  "
            f"{report['seconds']:>7}  {report['val_accuracy']:.3f}",
            flush=True,
        )


def _whole_runs(args):
    print("rows       vectors(float32)  peak RSS of the run  seconds")
    for rows in (args.rows // 4, args.rows):
        images = write_image_stubs(Path(args.folder) / f"images_{rows}", rows)
        report = whole_run_child(
            images,
            args.folder,
            Path(args.folder) / f"output_{rows}",
            () if args.report else ("--no-report",),
        )
        print(
            f"{rows:>9,}  {rows * FEATURE_DIM * 4 / 2**20:>12,.0f} MB  "
            f"{report['peak_rss_mb']:>15,} MB  {report['seconds']:>7}",
            flush=True,
        )
        print(f"           {report['cache_line']}\n           {report['checks_line']}", flush=True)


if __name__ == "__main__":
    main()
