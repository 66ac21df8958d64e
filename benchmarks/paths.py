"""The presets on real photo sets: cached head, a logistic regression on the same vectors, `--preset best`.

    python benchmarks/paths.py [--data DIR] [--work DIR] [--set NAME ...]

Each run is one `python -m retrain` process with exactly the flags printed,
timed from start to end (a cold bottleneck cache is filled once first, by a
--cache_only run, so the two presets are timed on a filled cache: the fill
time is printed apart). Sets, from --data (default ../shared/data):

* flowers128: 4,317 photos of 5 flowers, 128x128, the tool's hash split
  (10% test, 10% validation); scored on the test bucket;
* caltech101: train/ (5,784 photos of 101 categories) with the tool's split,
  scored on test/ (2,893 photos the run never sees);
* flowers32: the flowers128 photos shrunk to 32x32 (antialiased) and written
  as PNG, where ImageNet features fit worst.

Every accuracy is the exported model.keras on held-out photos, one image at a
time, decoded by plain TensorFlow (`tf.io.decode_image`), as a user's script
would. "logistic regression" is scikit-learn's LogisticRegression (C=1) fit
on the run's own training-bucket vectors from the cache, scored on the same
held-out photos' cached vectors. Fine-tuning's images/s and its ratio to the
forward pass come from the run's log. The machine may be shared: the CPU
model is printed; compare within one run.
"""

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PRESETS = {"cached head": ["--preset", "fast"], "--preset best": ["--preset", "best"]}
LOWRES_SIDE = 32
RATE = re.compile(r"Fine-tuning trained at ([\d.]+) images/s.*ran at ([\d.]+) images/s")


def write_lowres(source: Path, target: Path) -> Path:
    """`source`'s photos shrunk to 32x32 (antialiased) as PNG in `target` (written once)."""
    from PIL import Image

    if (target / ".written").exists():
        return target
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True, exist_ok=True)
        for photo in sorted(folder.glob("*.jpg")):
            with Image.open(photo) as image:
                image.convert("RGB").resize((LOWRES_SIDE, LOWRES_SIDE), Image.LANCZOS).save(
                    target / folder.name / f"{photo.stem}.png"
                )
    (target / ".written").touch()
    return target


def run(image_dir: Path, work: Path, name: str, flags: list[str]) -> dict:
    """One `python -m retrain` process: its output folder, wall seconds and stderr."""
    out = work / "runs" / image_dir.name / re.sub(r"\W+", "_", name).strip("_")
    command = [
        sys.executable,
        "-m",
        "retrain",
        "--image_dir",
        str(image_dir),
        "--bottleneck_dir",
        str(work / "cache"),
        "--output_dir",
        str(out),
        *flags,
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-3:]}")
    return {"out": out, "seconds": seconds, "stderr": done.stderr, "flags": " ".join(flags)}


def held_out(out: Path, image_dir: Path, test_dir: Path | None) -> list[tuple[Path, int]]:
    """(photo, class index) of the held-out photos: test_dir's, else the run's test bucket."""
    record = json.loads((out / "run_record.json").read_text())
    classes = record["class_names"]
    if test_dir is not None:
        return [
            (photo, classes.index(photo.parent.name))
            for photo in sorted(test_dir.glob("*/*"))
            if photo.parent.name in classes
        ]
    return [
        (image_dir / image["path"], image["label"])
        for image in record["images"]
        if image["split"] == "testing"
    ]


def model_accuracy(out: Path, photos: list[tuple[Path, int]]) -> float:
    """Top-1 accuracy of out/model.keras, one photo a call, decoded by tf.io.decode_image."""
    from retrain import export
    from retrain.quiet_tensorflow import import_tensorflow

    tf = import_tensorflow()
    model = export.load_classifier(out / "model.keras")
    hits = 0
    for photo, label in photos:
        pixels = tf.io.decode_image(
            tf.io.read_file(str(photo)), channels=3, expand_animations=False
        )
        probabilities = model(tf.cast(pixels, tf.float32)[None], training=False)
        hits += int(np.argmax(probabilities[0])) == label
    return hits / len(photos)


def regression_accuracy(out: Path, image_dir: Path, work: Path, photos) -> float:
    """LogisticRegression(C=1) on the run's training vectors, scored on the photos' vectors."""
    from sklearn.linear_model import LogisticRegression

    from retrain import backbones, engines
    from retrain.cache import BottleneckCache
    from retrain.config import Config
    from retrain.data import images

    record = json.loads((out / "run_record.json").read_text())
    name = backbones.DEFAULT_BACKBONE
    # The command line's engine (auto), which names the cache file the runs filled.
    cache = BottleneckCache(work / "cache", name, engine=engines.choose(Config().engine, name))

    def vectors(pairs):
        entries = [
            images.ImageEntry(str(path), "", label, "", images.cache_key(str(path)))
            for path, label in pairs
        ]
        return np.asarray(cache.read(entries), np.float32), np.array([p[1] for p in pairs])

    training = [
        (Path(image["path"]), image["label"])
        for image in record["images"]
        if image["split"] == "training"
    ]
    x, y = vectors(training)
    test_x, test_y = vectors(
        [(photo.relative_to(photo.parents[1]), label) for photo, label in photos]
    )
    regression = LogisticRegression(C=1.0, max_iter=2000).fit(x, y)
    return float(np.mean(regression.predict(test_x) == test_y))


def benchmark(name: str, image_dir: Path, test_dir: Path | None, work: Path) -> None:
    fill = run(image_dir, work, "fill", ["--cache_only"])
    if test_dir is not None:
        run(test_dir, work, "fill test", ["--cache_only"])
    print(f"{name}: cache filled in {fill['seconds']:.0f} s", flush=True)
    rows = {preset: run(image_dir, work, preset, flags) for preset, flags in PRESETS.items()}
    photos = held_out(rows["cached head"]["out"], image_dir, test_dir)
    logistic = regression_accuracy(rows["cached head"]["out"], image_dir, work, photos)
    print(f"  {'logistic regression (C=1)':<28} {logistic:.3f}", flush=True)
    for preset, row in rows.items():
        accuracy = model_accuracy(row["out"], photos)
        rate = RATE.search(row["stderr"])
        speed = f"   {rate[1]} images/s training, {rate[2]} forward" if rate else ""
        print(
            f"  {preset:<28} {accuracy:.3f} ({accuracy - logistic:+.3f})"
            f"   {row['seconds']:>6.0f} s{speed}   [{row['flags']}]",
            flush=True,
        )
    print(f"  ({len(photos)} held-out photos)", flush=True)


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help=f"(default {DATA})")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".paths")
    parser.add_argument("--set", action="append", choices=("flowers128", "caltech101", "flowers32"))
    args = parser.parse_args()
    sets = {
        "flowers128": (args.data / "flowers128", None),
        "caltech101": (args.data / "caltech101" / "train", args.data / "caltech101" / "test"),
        "flowers32": (args.data / "flowers128", None),
    }
    print(f"{cpu_model()}; held-out accuracy of the exported model (vs logistic regression)")
    for name in args.set or list(sets):
        image_dir, test_dir = sets[name]
        if not image_dir.is_dir():
            print(f"{name}: skipped, {image_dir} is absent", flush=True)
            continue
        if name == "flowers32":
            image_dir = write_lowres(image_dir, args.work / "flowers32")
        benchmark(name, image_dir, test_dir, args.work)


if __name__ == "__main__":
    main()
