"""How long the data checks take as the number of images grows.

    python benchmarks/data_checks_speed.py --image_dir FOLDER [--bottleneck_dir cache]
        [--sizes 10000 30000 100000]

Reads the cached EfficientNet-Lite0 bottlenecks of FOLDER (run `python -m
retrain --image_dir FOLDER --cache_only` first), then, for each size, tiles
them with 5% Gaussian jitter to that many vectors (labels repeat with them) and
times `find_label_issues` and `find_near_duplicates` on one thread, as a run
calls them. Synthetic rows keep the real vectors' statistics and class count;
the seconds are what matters here, not what is found.
"""

import argparse
import sys
import time

import numpy as np

from retrain.cache import BottleneckCache
from retrain.data import images
from retrain.errors import RetrainError
from retrain.evaluation import label_issues, near_duplicates


def tiled(vectors, labels, size, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.resize(np.arange(len(vectors)), size)
    jitter = rng.normal(0, 0.05, (size, vectors.shape[1])).astype(np.float32)
    return np.abs(vectors[rows] * (1 + jitter)), labels[rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_dir", required=True)
    parser.add_argument("--bottleneck_dir", default="cache")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    args = parser.parse_args()
    try:
        image_list = images.discover(args.image_dir)
        vectors = BottleneckCache(args.bottleneck_dir, "efficientnet_lite0").read(
            image_list.entries
        )
    except RetrainError as error:
        print(f"data_checks_speed: error: {error}", file=sys.stderr)
        return 2
    labels = np.array([entry.label_index for entry in image_list.entries])
    k = len(image_list.class_names)
    print(f"{args.image_dir}: {len(vectors)} cached vectors, {k} classes")
    print("images  label issues (s)  near-duplicates (s)")
    for size in args.sizes:
        x, y = tiled(vectors.astype(np.float32), labels, size)
        paths = [f"image_{i}" for i in range(size)]
        started = time.perf_counter()
        label_issues.find_label_issues(x, y, image_list.class_names, paths)
        issues_seconds = time.perf_counter() - started
        started = time.perf_counter()
        near_duplicates.find_near_duplicates(x, paths, ["training"] * size)
        duplicates_seconds = time.perf_counter() - started
        print(f"{size:6d}  {issues_seconds:16.1f}  {duplicates_seconds:19.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
