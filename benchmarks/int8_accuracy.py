"""`make bench-int8`: the cached head on int8 vectors against float vectors, one table.

    python benchmarks/int8_accuracy.py [--data DIR] [--work DIR] [--set NAME ...]
                                       [--engines litert,litert-int8]

For every photo set, one `python -m retrain --image_dir SET --engine E
--bottleneck_dir ... --output_dir ...` per engine, with every other setting at
its default (the cached head, the tool's hash split: 10% test), and the test
accuracy that run writes to metrics.json. The first engine is the reference
(float LiteRT), the second the one compared (int8). Sets, from --data (default
../shared/data; a set whose folder is missing is left out with a note):

* flowers128: 4,317 photos of 5 flowers, 128x128, heavily compressed;
* caltech101: caltech101/train, 5,784 photos of 101 categories;
* flowers32: the flowers128 photos shrunk to 32x32 PNG (`paths.write_lowres`),
  where ImageNet features fit worst.

Printed per set: images, each engine's test accuracy, the difference in
points, how many test predictions changed, and the cosine between the two
engines' vectors of the same image (median, minimum over every cached image;
the vectors are read as stored, so the cache's float16 rounding, about 5e-4,
is inside it). A run whose cache file does not carry the engine's name fell
back to another engine: the script stops and says so, rather than compare an
engine with itself. Caches and runs stay in --work, so a rerun only extracts
what is missing (delete --work to measure from scratch).
"""

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from bench import print_table
from paths import write_lowres

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = ("flowers128", "caltech101", "flowers32")
ENGINES = ("litert", "litert-int8")
_BLOCK = 4096  # rows of vectors compared at a time


@dataclasses.dataclass(frozen=True)
class EngineRun:
    """One `python -m retrain` run: test accuracy and count (metrics.json), its files."""

    engine: str
    accuracy: float
    test_images: int
    cache_file: Path
    output_dir: Path
    seconds: float


@dataclasses.dataclass(frozen=True)
class Changes:
    """Test images whose predicted class differs between two runs: ``fixed`` (wrong in
    the reference run, right in the compared one), ``broken`` (the other way), ``other``
    (wrong in both)."""

    fixed: int
    broken: int
    other: int

    @property
    def total(self) -> int:
        return self.fixed + self.broken + self.other


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One set's row: the reference run, the compared run and their vectors' cosines."""

    name: str
    images: int
    reference: EngineRun
    compared: EngineRun
    changes: Changes
    cosine_median: float
    cosine_min: float

    @property
    def points(self) -> float:
        """Compared minus reference test accuracy, in percentage points."""
        return 100.0 * (self.compared.accuracy - self.reference.accuracy)


def photo_sets(data: Path, work: Path, names) -> dict[str, Path]:
    """{set name: image folder} of the ``names`` found under ``data`` (notes the others)."""
    found = {}
    for name in names:
        if name == "flowers32":
            source = data / "flowers128"
            folder = write_lowres(source, work / "flowers32") if source.is_dir() else None
        else:
            folder = data / ("caltech101/train" if name == "caltech101" else name)
        if folder is None or not folder.is_dir():
            print(f"int8_accuracy: no {name} under {data}; left out", file=sys.stderr)
            continue
        found[name] = folder
    return found


def run_engine(image_dir: Path, work: Path, name: str, engine: str) -> EngineRun:
    """`python -m retrain` on ``image_dir`` with ``--engine engine``, defaults otherwise."""
    cache, output = work / "cache" / name / engine, work / "runs" / name / engine
    command = [sys.executable, "-m", "retrain", "--image_dir", str(image_dir)]
    command += ["--engine", engine, "--bottleneck_dir", str(cache), "--output_dir", str(output)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"int8_accuracy: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    # The engine part of the file name: the engine, perhaps with its calibration
    # version (litert-int8c1); "litert" must not match a litert-int8 file.
    own = re.compile(rf"-{re.escape(engine)}(c\d+)?-")
    files = sorted(path for path in cache.glob("*.h5") if own.search(path.name))
    if len(files) != 1:
        sys.exit(
            f"int8_accuracy: the {engine} run on {name} left no cache file of its own in "
            f"{cache} (it fell back to another engine?):\n{done.stderr[-2000:]}"
        )
    metrics = json.loads((output / "metrics.json").read_text())
    return EngineRun(engine, metrics["accuracy"], metrics["count"], files[0], output, seconds)


def cached_vectors(path: Path) -> tuple[np.ndarray, h5py.Dataset, h5py.File]:
    """(keys S64 [n], the bottleneck dataset [n, d], the open file) of a cache file."""
    file = h5py.File(path, "r")
    return file["images/key"][:], file["images/bottleneck"], file


def cosines(reference: Path, compared: Path) -> np.ndarray:
    """float64 [n]: cosine of the two caches' vectors of each image both hold.

    Read in blocks of ``_BLOCK`` images in the reference file's row order (a
    contiguous slice there, a sorted selection in the other file), so memory
    stays bounded by the block, not the set.
    """
    keys_a, vectors_a, file_a = cached_vectors(reference)
    keys_b, vectors_b, file_b = cached_vectors(compared)
    try:
        _, rows_a, rows_b = np.intersect1d(keys_a, keys_b, return_indices=True)
        order = np.argsort(rows_a)
        rows_a, rows_b = rows_a[order], rows_b[order]
        out = np.empty(len(rows_a))
        for start in range(0, len(rows_a), _BLOCK):
            block_a, block_b = rows_a[start : start + _BLOCK], rows_b[start : start + _BLOCK]
            a = vectors_a[block_a[0] : block_a[-1] + 1].astype(np.float64)[block_a - block_a[0]]
            sorted_b = np.argsort(block_b)
            b = np.empty_like(a)
            b[sorted_b] = vectors_b[block_b[sorted_b]].astype(np.float64)
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            out[start : start + len(a)] = np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-30)
        return out
    finally:
        file_a.close()
        file_b.close()


def changed_predictions(reference: EngineRun, compared: EngineRun) -> Changes:
    """The test predictions that differ, from each run's probabilities.npz (rows in the
    order of the test images of run_record.json, whose labels the reference run gives)."""
    record = json.loads((reference.output_dir / "run_record.json").read_text())
    labels = np.array([i["label"] for i in record["images"] if i["split"] == "testing"])
    predicted = []
    for run in (reference, compared):
        with np.load(run.output_dir / "probabilities.npz", allow_pickle=False) as arrays:
            predicted.append(arrays["testing"].argmax(axis=1))
    if not predicted[0].shape == predicted[1].shape == labels.shape:
        sys.exit("int8_accuracy: the two runs tested different images; cannot compare")
    changed = predicted[0] != predicted[1]
    right = [p == labels for p in predicted]
    return Changes(
        int((changed & ~right[0] & right[1]).sum()),
        int((changed & right[0] & ~right[1]).sum()),
        int((changed & ~right[0] & ~right[1]).sum()),
    )


def compare(name: str, image_dir: Path, work: Path, engines) -> Comparison:
    """The row of one set: both engines' runs, then their vectors compared."""
    reference, compared = (run_engine(image_dir, work, name, engine) for engine in engines)
    similarity = cosines(reference.cache_file, compared.cache_file)
    with h5py.File(compared.cache_file, "r") as file:
        images = len(file["images/key"])
    return Comparison(
        name,
        images,
        reference,
        compared,
        changed_predictions(reference, compared),
        float(statistics.median(similarity)),
        float(similarity.min()),
    )


def table(rows: list[Comparison], engines) -> list[tuple[str, ...]]:
    """The printed table: a header row, then one row of strings per set."""
    first, second = engines
    header = (
        "set",
        "images",
        "test images",
        f"{first} acc",
        f"{second} acc",
        "difference (points)",
        "test predictions changed (fixed / broken / other)",
        "cosine median",
        "cosine min",
    )
    return [header] + [
        (
            row.name,
            f"{row.images:,}",
            f"{row.reference.test_images:,}",
            f"{row.reference.accuracy:.4f}",
            f"{row.compared.accuracy:.4f}",
            f"{row.points:+.2f}",
            f"{row.changes.total} ({row.changes.fixed} / {row.changes.broken} / "
            f"{row.changes.other})",
            f"{row.cosine_median:.4f}",
            f"{row.cosine_min:.4f}",
        )
        for row in rows
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the photo sets")
    parser.add_argument(
        "--work", type=Path, default=ROOT / "output" / "bench_int8", help="caches and runs"
    )
    parser.add_argument("--set", action="append", choices=SETS, help="a set (default: all)")
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="two engines, reference first, comma-separated (default: litert,litert-int8)",
    )
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    if len(engines) != 2 or engines[0] == engines[1]:
        parser.error(f"--engines needs two different engines. Received: {args.engines!r}")
    sets = photo_sets(args.data, args.work, args.set or SETS)
    if not sets:
        print(f"int8_accuracy: no photo set under {args.data}; pass --data DIR", file=sys.stderr)
        return 2
    rows = []
    for name, folder in sets.items():
        rows.append(compare(name, folder, args.work, engines))
        print(
            f"int8_accuracy: {name} done ({rows[-1].reference.seconds:.0f} s + "
            f"{rows[-1].compared.seconds:.0f} s)",
            file=sys.stderr,
        )
    print(f"{engines[1]} against {engines[0]}: the cached head's test accuracy (metrics.json)")
    print_table(table(rows, engines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
