"""Test accuracy of retrain's default softmax head next to a plain logistic regression.

    python benchmarks/head_vs_logreg.py [--image_dir FOLDER ...] [--splits N]
                                        [--held_out TRAIN TEST ...]
                                        [--bottleneck_dir cache]

Issue #4 asks for defaults good enough that a user never needs to tune them to
reach the accuracy a plain logistic regression reaches on the same vectors.
For each dataset this trains, on the same cached EfficientNet-Lite0 bottlenecks
and the same hash split (10% test, 10% validation):

* the head: ``retrain.training.head.train_head`` with the settings of ``Config()``;
* the exact penalised fit with C chosen by grouped cross-validation on the
  training vectors (``logreg_cv.fit_by_cross_validation``);
* scikit-learn's ``LogisticRegression(C=1)`` fit on the training bucket;
* ``LogisticRegression`` with C chosen on the validation bucket from C_GRID;

and prints their test accuracies, the head's best step and training time, and
head minus the better of the two regressions. ``--splits N`` repeats all three
on N random re-splits (seeded, bucket sizes kept) of the pooled vectors and adds
mean and min over the 1 + N splits; best step and seconds are then medians.

Datasets: scikit-learn's digits, written as 8x8 PNGs by examples/make_digits.py
(always available), then each --image_dir; by default ../shared/data/flowers128
when that folder exists. ``--held_out TRAIN TEST`` trains on TRAIN's hash
split (its testing bucket unused) and scores on every image of TEST, a real
held-out set; by default ../shared/data/caltech101/train and test when present
(held-out sets are not re-split). Vectors come from ``BottleneckCache`` in
--bottleneck_dir, so a second run extracts nothing.
"""

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()  # before anything else imports it, so stderr keeps only our lines

from sklearn.linear_model import LogisticRegression  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from retrain import backbones  # noqa: E402
from retrain.cache import BottleneckCache  # noqa: E402
from retrain.config import Config  # noqa: E402
from retrain.data import class_checks, images
from retrain.errors import RetrainError  # noqa: E402
from retrain.training.head import train_head
from retrain.training.settings import HeadSettings, RunOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import logreg_cv  # noqa: E402  (beside this script)
from make_digits import write_digits  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers128"
HEAD_SETTINGS = (
    "how_many_training_steps",
    "learning_rate",
    "train_batch_size",
    "validation_batch_size",
    "eval_step_interval",
    "seed",
)
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
HELD_OUT = DEFAULT_DATA.parent / "caltech101"
METHODS = ("head", "head_cv", "lr_c1", "lr_tuned", "head_minus_best_lr", "head_cv_minus_best_lr")
LABELS = {
    "head": "softmax head, Config() defaults",
    "head_cv": "exact fit, C by grouped CV",
    "head_cv_minus_best_lr": "CV fit - best LR (difference)",
    "lr_c1": "LogisticRegression C=1",
    "lr_tuned": "LogisticRegression, C tuned on val",
    "head_minus_best_lr": "head - best LR (difference)",
}


@dataclasses.dataclass(frozen=True)
class Vectors:
    """One folder's cached bottlenecks: x float32 [n, 1280], y int64 [n], buckets str [n], paths."""

    x: np.ndarray
    y: np.ndarray
    buckets: np.ndarray
    paths: list
    class_names: list


def cached_vectors(image_dir, cache, config, need_buckets=True):
    """The Vectors of every usable image of image_dir (filling the cache first)."""
    image_list = images.discover(image_dir, config.testing_percentage, config.validation_percentage)
    report = cache.update(image_list, batch_size=config.extraction_batch_size)
    print(
        f"{image_dir}: {report.extracted} extracted, {report.reused} reused, "
        f"{len(report.failed)} failed, in {report.path}",
        file=sys.stderr,
    )
    failed = {path for path, _ in report.failed}
    usable = [entry for entry in image_list.entries if entry.relative_path not in failed]
    class_checks.check_classes(dataclasses.replace(image_list, entries=usable))
    buckets = np.array([entry.split_bucket for entry in usable])
    missing = [name for name in images.BUCKETS if not np.any(buckets == name)]
    if missing and need_buckets:
        raise RetrainError(
            f"The split of {image_dir} leaves {missing} empty; the comparison "
            f"needs all three buckets. Add images. Received: image_dir={image_dir}"
        )
    paths = [entry.relative_path for entry in usable]
    x = np.asarray(cache.read(usable), dtype=np.float32)
    return Vectors(x, images.labels_of(usable), buckets, paths, image_list.class_names)


def score_split(vectors, buckets, num_classes, config, test=None):
    """Test accuracies of both heads and both regressions on one split, and the heads' figures.

    test: (x, y) held-out vectors scored instead of the testing bucket, or None.
    """
    x, y = vectors.x, vectors.y
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        (x[buckets == name], y[buckets == name]) for name in images.BUCKETS
    )
    if test is not None:
        test_x, test_y = test
    start = time.perf_counter()
    trained = train_head(
        train_x,
        train_y,
        val_x,
        val_y,
        num_classes,
        HeadSettings.from_config(config, RunOptions(progress=False)),
    )
    seconds = time.perf_counter() - start
    # A direct call, not predict(): predict traces a new tf.function for every
    # new head, and TensorFlow warns about the retracing from the fifth on.
    predicted = np.asarray(trained.head(test_x, training=False)).argmax(axis=1)
    head = float(np.mean(predicted == test_y))
    start = time.perf_counter()
    train_paths = [path for path, bucket in zip(vectors.paths, buckets) if bucket == "training"]
    weights, choice = logreg_cv.fit_by_cross_validation(
        train_x, train_y, num_classes, train_paths, seed=config.seed
    )
    cv_seconds = time.perf_counter() - start
    head_cv = float(np.mean(weights.logits(test_x).argmax(axis=1) == test_y))
    # One BLAS thread: on the shared, loaded 2-core machine lbfgs with both
    # threads took 126 s for digits' C=1, one thread 2.6 s.
    with threadpool_limits(1):
        fits = {c: LogisticRegression(C=c, max_iter=5000).fit(train_x, train_y) for c in C_GRID}
    # max() keeps the first of equal scores: the smallest C, the strongest penalty.
    best_c = max(C_GRID, key=lambda c: fits[c].score(val_x, val_y))
    lr_c1, lr_tuned = fits[1.0].score(test_x, test_y), fits[best_c].score(test_x, test_y)
    return {
        "head": head,
        "head_cv": head_cv,
        "lr_c1": lr_c1,
        "lr_tuned": lr_tuned,
        "head_minus_best_lr": head - max(lr_c1, lr_tuned),
        "head_cv_minus_best_lr": head_cv - max(lr_c1, lr_tuned),
        "best_c": best_c,
        "cv_c": choice.c,
        "best_step": trained.best_step,
        "seconds": seconds,
        "cv_seconds": cv_seconds,
    }


def compare(name, vectors, config, splits, test=None):
    """Scores the hash split and `splits` random re-splits; prints the dataset's table.

    test: a held-out set's Vectors, scored instead of the testing bucket (no re-splits then).
    """
    buckets = vectors.buckets
    counts = {bucket: int(np.sum(buckets == bucket)) for bucket in images.BUCKETS}
    if test is not None:
        counts["testing"], splits = f"{len(test.y)} (held out)", 0
    print(f"{name}: scoring the hash split and {splits} random re-splits", file=sys.stderr)
    rng = np.random.default_rng(config.seed)
    # A permutation of the hash split's buckets keeps the bucket sizes.
    split_buckets = [buckets] + [rng.permutation(buckets) for _ in range(splits)]
    held = None if test is None else (test.x, test.y)
    classes = len(vectors.class_names)
    results = [score_split(vectors, b, classes, config, held) for b in split_buckets]

    print(
        f"\n{name}: {classes} classes, n_train {counts['training']}, "
        f"n_val {counts['validation']}, n_test {counts['testing']}"
    )
    header = f"{'test accuracy':40s} {'hash split':>10s}"
    if splits:
        header += f" {f'mean of {splits + 1}':>11s} {f'min of {splits + 1}':>10s}"
    print(header)
    for method in METHODS:
        values = [result[method] for result in results]
        sign = "+" if method.endswith("minus_best_lr") else ""
        line = f"{LABELS[method]:40s} {values[0]:{sign}10.4f}"
        if splits:
            line += f" {statistics.mean(values):{sign}11.4f} {min(values):{sign}10.4f}"
        print(line)
    tuned = ", ".join(f"{result['best_c']:g}" for result in results)
    chosen = ", ".join(f"{result['cv_c']:g}" for result in results)
    median = "median " if splits else ""
    print(
        f"C tuned on val: {tuned}; C by grouped CV: {chosen}; head best_step {median}"
        f"{statistics.median(r['best_step'] for r in results):.0f}, training {median}"
        f"{statistics.median(r['seconds'] for r in results):.1f} s; CV head {median}"
        f"{statistics.median(r['cv_seconds'] for r in results):.1f} s"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--image_dir",
        type=Path,
        action="append",
        help="folder with one sub-folder per class; repeatable "
        f"(default: {DEFAULT_DATA} when present)",
    )
    parser.add_argument(
        "--splits",
        type=int,
        default=0,
        help="extra random re-splits of the pooled vectors (default 0)",
    )
    parser.add_argument(
        "--bottleneck_dir",
        default=Config().bottleneck_dir,
        help="persistent bottleneck cache folder (default: ./cache)",
    )
    parser.add_argument(
        "--held_out",
        type=Path,
        nargs=2,
        action="append",
        metavar=("TRAIN", "TEST"),
        help="train on TRAIN, score on every image of TEST; repeatable "
        f"(default: {HELD_OUT}/train and test when present)",
    )
    args = parser.parse_args(argv)
    if args.splits < 0:
        parser.error(f"--splits must be 0 or more. Received: splits={args.splits}")
    config = Config(bottleneck_dir=args.bottleneck_dir)
    cache = BottleneckCache(
        config.bottleneck_dir, backbones.DEFAULT_BACKBONE, dtype=config.bottleneck_dtype
    )
    print(
        f"Backbone {backbones.DEFAULT_BACKBONE}; head settings "
        + ", ".join(f"{name}={getattr(config, name)}" for name in HEAD_SETTINGS)
        + f"; C grid {', '.join(f'{c:g}' for c in C_GRID)}"
    )
    try:
        with tempfile.TemporaryDirectory() as folder:
            write_digits(folder)
            digits = cached_vectors(Path(folder), cache, config)
        compare("digits", digits, config, args.splits)
        folders = args.image_dir
        if folders is None:
            folders = [DEFAULT_DATA]
            if not DEFAULT_DATA.is_dir():
                print(
                    f"\n{DEFAULT_DATA.name}: skipped, {DEFAULT_DATA} is absent "
                    "(pass --image_dir FOLDER to compare on your own photos)"
                )
                folders = []
        for image_dir in folders:
            compare(image_dir.name, cached_vectors(image_dir, cache, config), config, args.splits)
        for train_dir, test_dir in _held_out_pairs(args.held_out):
            train, test = (
                cached_vectors(train_dir, cache, config),
                cached_vectors(test_dir, cache, config, need_buckets=False),
            )
            if test.class_names != train.class_names:
                raise RetrainError(
                    f"{test_dir} must hold the classes of {train_dir}. Received: "
                    f"{len(test.class_names)} and {len(train.class_names)} class folders"
                )
            compare(f"{train_dir.parent.name}/{train_dir.name}", train, config, 0, test)
    except RetrainError as error:
        print(f"head_vs_logreg: {error}", file=sys.stderr)
        return 2
    return 0


def _held_out_pairs(pairs):
    """The (train, test) folder pairs asked for, or the default pair when its folders exist."""
    if pairs is not None:
        return pairs
    if (HELD_OUT / "train").is_dir() and (HELD_OUT / "test").is_dir():
        return [(HELD_OUT / "train", HELD_OUT / "test")]
    print(f"\n{HELD_OUT.name}: skipped, {HELD_OUT}/train or test is absent")
    return []


if __name__ == "__main__":
    sys.exit(main())
