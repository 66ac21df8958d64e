"""Bottleneck extraction speed next to the backbone's forward-only speed.

    python benchmarks/extraction.py [--images 400] [--batch_size 32] [--runs 3]

Over a sample of real photos (../shared/data/caltech101 by default) it prints,
in one process on one machine:

* cache build: ``BottleneckCache.update`` into an empty temporary cache, wall
  clock including building the backbone (what a user waits for);
* pipeline: ``extraction.bottleneck_batches`` with the backbone already built
  (read, hash, decode, resize, forward), steady state;
* forward only: the same backbone on pre-decoded, pre-resized arrays;
* their ratio (the median of the per-run ratios: each run pairs a pipeline
  and a forward-only pass made back to back), and the peak resident memory of
  the cache builds.

Each figure is the median over ``--runs`` runs.
"""

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from retrain import backbones, engines
from retrain.cache import BottleneckCache
from retrain.data import decode, images, resizing
from retrain.engines import extraction
from retrain.quiet_tensorflow import import_tensorflow

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101"


def sample(image_dir, count):
    """An ImageList of ``count`` images spread evenly over all classes."""
    found = images.discover(image_dir)
    step = max(1, len(found.entries) // count)
    return dataclasses.replace(found, entries=found.entries[::step][:count], skipped=[])


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def cache_build(image_list, backbone, batch_size):
    with tempfile.TemporaryDirectory() as folder:
        cache = BottleneckCache(folder, backbone)
        seconds, report = timed(lambda: cache.update(image_list, batch_size, progress=False))
    return len(image_list.entries) / seconds, report


def pipeline(paths, model, input_size, batch_size):
    """Images/s of the extraction pipeline after its first batch (warm-up)."""
    engine = engines.KerasEngine(model, input_size)
    batches = extraction.bottleneck_batches(paths, engine, input_size, batch_size)
    warm = len(next(batches))
    seconds, done = timed(lambda: sum(len(batch) for batch in batches))
    return done / seconds if done else warm / seconds


def forward_only(arrays, model, batch_size):
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False))
    batches = [
        tf.constant(arrays[i : i + batch_size])
        for i in range(0, len(arrays) - batch_size + 1, batch_size)
    ]
    forward(batches[0])
    seconds, _ = timed(lambda: [forward(batch).numpy() for batch in batches])
    return len(batches) * batch_size / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder with one sub-folder per class (searched recursively)",
    )
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backbone", default=backbones.DEFAULT_BACKBONE)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.runs < 1 or args.images < 2 * args.batch_size:
        # Steady-state figures leave out the first batch (tracing, warm-up),
        # so at least one more full batch must follow it.
        parser.error(
            "need --batch_size >= 1, --runs >= 1 and --images >= 2 x --batch_size. "
            f"Received: batch_size={args.batch_size}, runs={args.runs}, "
            f"images={args.images}"
        )
    image_dir = args.data / "train" if (args.data / "train").is_dir() else args.data
    if not image_dir.is_dir():
        print(
            f"No photos to benchmark: {args.data} is absent. Pass --data FOLDER "
            "(one sub-folder per class).",
            file=sys.stderr,
        )
        return 1

    import_tensorflow()  # without its start-up noise, before anything imports it
    image_list = sample(image_dir, args.images)
    spec = backbones.get(args.backbone)
    print(
        f"{len(image_list.entries)} photos from {image_dir}, backbone {spec.name}, "
        f"batch {args.batch_size}, median of {args.runs} runs, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )

    builds = [cache_build(image_list, spec.name, args.batch_size) for _ in range(args.runs)]
    # Before the forward-only test holds its pre-decoded arrays.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = backbones.load(spec.name)
    paths = [image_list.image_dir / e.relative_path for e in image_list.entries]
    # The network's speed does not depend on the pixels: a few batches do.
    arrays = np.stack(
        [
            resizing.resize_to_input(decode.decode_rgb(path, spec.input_size), spec.input_size)
            for path in paths[: 8 * args.batch_size]
        ]
    )
    # Interleaved, so that a change in the machine's load hits both alike.
    rates, forward = [], []
    for _ in range(args.runs):
        rates.append(pipeline(paths, model, spec.input_size, args.batch_size))
        forward.append(forward_only(arrays, model, args.batch_size))

    failed = len(builds[0][1].failed)
    print(
        f"cache build (incl. building the backbone): "
        f"{statistics.median(r for r, _ in builds):7.1f} images/s ({failed} failed)"
    )
    print(f"extraction pipeline, backbone built:       {statistics.median(rates):7.1f} images/s")
    print(f"backbone forward only, pre-decoded:        {statistics.median(forward):7.1f} images/s")
    ratios = [rate / alone for rate, alone in zip(rates, forward)]
    print(f"pipeline / forward only, median of paired runs: {statistics.median(ratios):4.2f}")
    print(f"peak resident memory during the cache builds: {peak:4.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
