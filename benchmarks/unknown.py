"""Unknown detection and calibration on real photos (`make bench-unknown`, issue 24).

Default: trains with the command line's defaults (`python -m retrain
--image_dir DIR`) on one photo folder (../shared/data/flowers128), then runs
`python -m retrain.label_image --json` on (a) the run's held-out test photos
(from its run record), (b) scikit-image's sample photos and (c)
../shared/data/caltech101/test photos of classes that are not flowers, and
prints the share of each called unknown, with the expected calibration error
before and after calibration from the run's metrics.json. `--caltech_classes
10` adds a second set: 10 Caltech-101 classes trained, the test photos of
the other 91 as the unknowns.

`--compare` instead measures the choices behind retrain.evaluation.unknown on
cached vectors (no training): the K-th nearest neighbour's cosine distance
for K in 1, 5, 10, 20 and reference caps of 1024, 2048, 4096 and all
training vectors, beside the Mahalanobis distance to the class means with a
shared, shrunk covariance, and the float16 reference of the sidecar file
against float32. The figures are in docs/unknown.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrain.evaluation import unknown  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
# Caltech-101 classes that are flowers or plants: not "other things" for a
# flower classifier.
FLOWER_LIKE = {"sunflower", "lotus", "water_lilly", "bonsai", "joshua_tree"}
# scikit-image's bundled sample pictures (no download): photos, micrographs,
# textures, a scanned page; grey ones are written as RGB.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "clock",
)
KS = (1, 5, 10, 20)
CAPS = (1024, 2048, 4096, None)


# --- the comparison on cached vectors -------------------------------------------------------


def cached(cache_dir: Path, image_dir: Path):
    """(ImageList, float32 [n, 1280] vectors of its entries) from a filled cache."""
    from retrain import backbones, engines
    from retrain.cache import BottleneckCache
    from retrain.config import Config
    from retrain.data import images

    image_list = images.discover(image_dir)
    name = backbones.DEFAULT_BACKBONE
    cache = BottleneckCache(cache_dir, name, engine=engines.choose(Config().engine, name))
    return image_list, np.asarray(cache.read(image_list.entries), np.float32)


def fill(cache_dir: Path, image_dir: Path) -> None:
    """`retrain --cache_only` on image_dir (nothing to do when the cache holds it)."""
    command = [sys.executable, "-m", "retrain", "--image_dir", str(image_dir)]
    command += ["--cache_only", "--bottleneck_dir", str(cache_dir)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)


def mahalanobis_scores(reference, labels, queries) -> np.ndarray:
    """float [m]: distance to the nearest class mean under the shared Ledoit-Wolf covariance."""
    from sklearn.covariance import LedoitWolf

    classes = np.unique(labels)
    means = np.stack([reference[labels == c].mean(axis=0) for c in classes])
    centred = reference - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf().fit(centred).precision_
    best = np.full(len(queries), np.inf)
    for mean in means:
        offset = queries - mean
        best = np.minimum(best, ((offset @ precision) * offset).sum(axis=1))
    return np.sqrt(best)


def capped(entries, vectors, cap):
    """The reference rows the run would keep: retrain.evaluation.unknown.reference_entries."""
    if cap is None:
        return vectors
    row = {entry.key: i for i, entry in enumerate(entries)}
    return vectors[[row[e.key] for e in unknown.reference_entries(entries, cap)]]


def print_row(name, threshold, scores_in, scores_out, milliseconds=None) -> None:
    """One method's row: shares flagged past `threshold`, AUROC (threshold-free), ms a photo."""
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(
        np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))], np.r_[scores_in, scores_out]
    )
    speed = "" if milliseconds is None else f"{milliseconds:>9.3f}"
    print(
        f"  {name:<34} {np.mean(scores_in > threshold):>16.3f} "
        f"{np.mean(scores_out > threshold):>14.3f} {auroc:>6.4f} {speed}",
        flush=True,
    )


def compare_set(title, train, validation, inside, outside) -> None:
    """Prints in-class and other-things shares flagged at 95% acceptance for each method.

    train, validation: (entries, float32 vectors); inside, outside: float32 vectors."""
    print(
        f"{title}: {len(train[1])} training, {len(validation[1])} validation vectors; "
        f"{len(inside)} held-out in-class, {len(outside)} other photos",
        flush=True,
    )
    print(f"  {'method':<34} {'in-class flagged':>16} {'others flagged':>14} {'AUROC':>6} ms/photo")
    for cap in CAPS:
        reference = capped(train[0], train[1], cap)
        for k in KS:
            detector = unknown.fit(reference, validation[1], 0.95, k)
            start = time.perf_counter()
            scores_in = detector.scores(inside)
            milliseconds = (time.perf_counter() - start) / len(inside) * 1000
            name = f"k={k}, reference {cap or 'all'} ({len(reference)})"
            print_row(name, detector.threshold, scores_in, detector.scores(outside), milliseconds)
    detector = unknown.fit(capped(train[0], train[1], unknown.MAX_REFERENCE), None, 0.95)
    print_row(
        f"k={unknown.K}, leave-one-out threshold",
        detector.threshold,
        detector.scores(inside),
        detector.scores(outside),
    )
    labels = np.array([e.label_index for e in train[0]])
    threshold = np.quantile(mahalanobis_scores(train[1], labels, validation[1]), 0.95)
    print_row(
        "Mahalanobis, shared shrunk cov.",
        threshold,
        mahalanobis_scores(train[1], labels, inside),
        mahalanobis_scores(train[1], labels, outside),
    )
    half_precision(capped(train[0], train[1], unknown.MAX_REFERENCE), validation[1], outside)


def half_precision(reference, validation, queries) -> None:
    """Prints how far scores against a float16 reference (the sidecar) are from float32."""
    full = unknown.fit(reference, validation, 0.95)
    half = unknown.UnknownDetector(
        unknown.unit_rows(full.reference.astype(np.float16)), full.k, full.threshold, 0.95
    )
    both = np.concatenate([validation, queries])
    a, b = full.scores(both), half.scores(both)
    same = np.mean(full.is_unknown(a) == half.is_unknown(b))
    print(
        f"  float16 reference: largest score difference {np.abs(a - b).max():.2e}, "
        f"same unknown decision on {same:.4f} of {len(both)} vectors"
    )


def shrunk_like_flowers128(photos: list[Path], folder: Path) -> Path:
    """The photos centre-cropped, resized to 128x128 and saved as JPEG quality 40 (class
    folders kept): other things at flowers128's size and blur, so that resolution alone
    does not tell them apart."""
    from PIL import Image

    for photo in photos:
        # A name of its own: the cache keys vectors by relative path (docs/cache.md).
        target = folder / photo.parent.name / f"{photo.stem}_128px.jpg"
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(photo) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((128, 128))
            image.save(target, quality=40)
    return folder


def split(image_list, vectors, bucket):
    chosen = [i for i, e in enumerate(image_list.entries) if e.split_bucket == bucket]
    return [image_list.entries[i] for i in chosen], vectors[chosen]


def compare(cache_dir: Path, flowers: Path, caltech: Path, seeds: int) -> None:
    """The flowers set (others: Caltech-101 test photos of other things, as they are and
    shrunk to 128 px) and Caltech-101 draws of 10 classes (`seeds` of them) and of 50
    classes (others: the test photos of the remaining classes)."""
    others = [p for p in sorted((caltech / "test").glob("*/*")) if p.parent.name not in FLOWER_LIKE]
    small = shrunk_like_flowers128(others, cache_dir.parent / "caltech101_test_128")
    for folder in (flowers, caltech / "train", caltech / "test", small):
        fill(cache_dir, folder)
    flower_list, flower_vectors = cached(cache_dir, flowers)
    train_list, train_vectors = cached(cache_dir, caltech / "train")
    test_list, test_vectors = cached(cache_dir, caltech / "test")
    test_names = np.array([e.label for e in test_list.entries])
    not_flowers = ~np.isin(test_names, sorted(FLOWER_LIKE))
    compare_set(
        f"{flowers.name} (5 classes) against Caltech-101 test photos of other things",
        split(flower_list, flower_vectors, "training"),
        split(flower_list, flower_vectors, "validation"),
        split(flower_list, flower_vectors, "testing")[1],
        test_vectors[not_flowers],
    )
    compare_set(
        f"{flowers.name} (5 classes) against the same photos shrunk to 128x128 JPEG",
        split(flower_list, flower_vectors, "training"),
        split(flower_list, flower_vectors, "validation"),
        split(flower_list, flower_vectors, "testing")[1],
        cached(cache_dir, small)[1],
    )
    train_names = np.array([e.label for e in train_list.entries])
    for seed, classes in [(seed, 10) for seed in range(seeds)] + [(0, 50)]:
        chosen = np.random.default_rng(seed).choice(train_list.class_names, classes, replace=False)
        rows = np.flatnonzero(np.isin(train_names, chosen))
        entries = [train_list.entries[i] for i in rows]
        # The run's own split of the caltech train folder: 10% validation, the rest
        # (testing bucket included) fits the reference; caltech101/test is held out.
        is_validation = np.array([e.split_bucket == "validation" for e in entries])
        inside = np.isin(test_names, chosen)
        compare_set(
            f"Caltech-101, {classes} classes (seed {seed}) against the other classes' test photos",
            (
                [e for e, v in zip(entries, is_validation) if not v],
                train_vectors[rows][~is_validation],
            ),
            ([e for e, v in zip(entries, is_validation) if v], train_vectors[rows][is_validation]),
            test_vectors[inside],
            test_vectors[~inside],
        )


# --- trained with the command line's defaults, labelled by label_image ---------------------


def train(image_dir: Path, work: Path, cache_dir: Path, run_args=()) -> Path:
    """`python -m retrain --image_dir image_dir` with its defaults (plus run_args); returns
    the output folder."""
    out = work / "runs" / image_dir.name
    command = [sys.executable, "-m", "retrain", "--image_dir", str(image_dir)]
    command += ["--bottleneck_dir", str(cache_dir), "--output_dir", str(out), *run_args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
    print(f"trained on {image_dir} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def unknown_share(out: Path, photos: list[Path]) -> tuple[float | None, int]:
    """(share of photos label_image --json calls unknown or None without the field, count)."""
    command = [sys.executable, "-m", "retrain.label_image", "--graph", str(out / "model.keras")]
    command += ["--labels", str(out / "labels.txt"), "--json", "--image", *map(str, photos)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if not done.stdout.strip():
        raise RuntimeError(f"label_image failed: {done.stderr.strip()[-2000:]}")
    results = json.loads(done.stdout)["results"]
    flags = [result.get("unknown") for result in results]
    if not results or any(flag is None for flag in flags):
        return None, len(results)
    return float(np.mean(flags)), len(results)


def skimage_photos(folder: Path) -> list[Path]:
    """scikit-image's sample photos written as PNG files (colour ones as they are)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SKIMAGE_PHOTOS:
        pixels = getattr(data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # stereo: the left view
        pixels = np.stack([pixels] * 3, axis=-1) if pixels.ndim == 2 else pixels[..., :3]
        path = folder / f"{name}.png"
        Image.fromarray(np.asarray(pixels, np.uint8)).save(path)
        written.append(path)
    return written


def report(out: Path, sets: dict[str, list[Path]]) -> None:
    """Prints each set's unknown share and the run's ECE before and after calibration."""
    from retrain.evaluation import run_record

    record = run_record.load(out)
    held_out = [
        Path(record.image_dir) / image
        for image, bucket in zip(record.images, record.splits)
        if bucket == "testing"
    ]
    for name, photos in {"held-out photos of its classes": held_out, **sets}.items():
        share, count = unknown_share(out, photos)
        shown = "no 'unknown' field in label_image --json" if share is None else f"{share:.3f}"
        print(f"  called unknown: {name:<44} {shown} of {count}", flush=True)
    metrics = json.loads((out / "metrics.json").read_text())
    calibration = metrics.get("calibration")
    if calibration is None:
        print("  metrics.json has no 'calibration' key yet")
    else:
        floor = ece_noise_floor(record.probabilities["testing"])
        print(
            f"  test accuracy {metrics['accuracy']:.4f}; temperature "
            f"{calibration['temperature']:.3f}; test ECE (15 bins): "
            f"{calibration['ece_before']:.4f} before calibration, "
            f"{calibration['ece_after']:.4f} after; a perfectly calibrated model with these "
            f"probabilities on {len(held_out)} images: median {floor[0]:.4f}, 90th percentile "
            f"{floor[1]:.4f}",
            flush=True,
        )


def ece_noise_floor(probabilities, draws: int = 200) -> tuple[float, float]:
    """(median, 90th percentile) of the ECE of labels drawn from `probabilities` themselves:
    what a perfectly calibrated model scores on this many images, sampling noise alone."""
    from retrain.evaluation import calibration

    rng = np.random.default_rng(0)
    cumulative = np.cumsum(np.asarray(probabilities, np.float64), axis=1)
    errors = []
    for _ in range(draws):
        labels = (rng.random((len(cumulative), 1)) > cumulative).sum(axis=1)
        labels = np.minimum(labels, cumulative.shape[1] - 1)
        errors.append(calibration.expected_calibration_error(probabilities, labels))
    return float(np.median(errors)), float(np.percentile(errors, 90))


def end_to_end(image_dir: Path, caltech: Path, work: Path, classes: int, run_args=()) -> None:
    cache_dir = work / "cache"
    others = [
        photo
        for photo in sorted((caltech / "test").glob("*/*"))
        if photo.parent.name not in FLOWER_LIKE
    ]
    out = train(image_dir, work, cache_dir, run_args)
    report(
        out,
        {
            "scikit-image sample photos": skimage_photos(work / "skimage"),
            "Caltech-101 test photos, not flowers": others,
        },
    )
    if classes:
        names = sorted(p.name for p in (caltech / "train").iterdir() if p.is_dir())
        chosen = set(np.random.default_rng(0).choice(names, classes, replace=False))
        subset = work / f"caltech{classes}"
        for name in chosen:
            (subset / name).mkdir(parents=True, exist_ok=True)
            for photo in (caltech / "train" / name).iterdir():
                target = subset / name / photo.name
                if not target.exists():
                    target.symlink_to(photo.resolve())
        out = train(subset, work, cache_dir, run_args)
        left_out = [
            p for p in sorted((caltech / "test").glob("*/*")) if p.parent.name not in chosen
        ]
        report(out, {f"Caltech-101 test photos of the other {len(names) - classes}": left_out})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_dir", type=Path, default=DATA / "flowers128")
    parser.add_argument("--caltech", type=Path, default=DATA / "caltech101")
    parser.add_argument("--work_dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--caltech_classes", type=int, default=0, help="also train on N classes")
    parser.add_argument("--compare", action="store_true", help="compare methods on cached vectors")
    parser.add_argument("--bottleneck_dir", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3, help="--compare: draws of 10 classes")
    parser.add_argument(
        "--run_args",
        default="",
        help='more flags for the training runs, e.g. "--preset best" (default: none)',
    )
    args = parser.parse_args()
    for folder in (args.image_dir, args.caltech):
        if not folder.is_dir():
            sys.exit(f"{folder} is missing: this benchmark needs ../shared/data (see its README).")
    with tempfile.TemporaryDirectory(prefix="bench-unknown-") as temporary:
        work = args.work_dir or Path(temporary)
        if args.compare:
            compare(args.bottleneck_dir or work / "cache", args.image_dir, args.caltech, args.seeds)
        else:
            end_to_end(
                args.image_dir, args.caltech, work, args.caltech_classes, args.run_args.split()
            )
    print(f"CPU: {cpu_model()}")


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
