"""Test accuracy and wall time of the three training paths: cached head, distortions, fine-tuning.

    python benchmarks/paths.py [--image_dir FOLDER ...] [--no-lowres] [--work DIR]

Each path is one `python -m retrain` process with exactly the flags below, on
the same images, hash split (10% test, 10% validation) and seed; the test
accuracy is the run's metrics.json (the test bucket through the exported
model's pixels path), the time is the process's wall time with the bottleneck
cache already filled (a --cache_only run fills it first). Datasets:

* each --image_dir; by default the first 300 photos a class of
  ../shared/data/flowers128 when present (real photos, 128x128; linked, not
  copied), so that the fine-tuning run stays within a quarter of an hour;
* a low-resolution set (unless --no-lowres): the flowers128 photos shrunk
  to 32x32 and written back as PNG, 500 a class (5 classes, about 2,000
  training photos), where ImageNet features fit poorly. Caltech-101's largest
  classes shrunk the same way were too easy to show anything (cached head
  0.98 test accuracy on 10 classes), so flowers are used.

The machine is usually shared: compare the paths within one run.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
AUGMENT = ["--flip_left_right", "--random_crop", "10", "--random_scale", "10"]
PATHS = {
    "cached head": [],
    "distortions": [*AUGMENT, "--how_many_training_steps", "300", "--train_batch_size", "32"],
    "fine-tuning": ["--fine_tune_layers", "-1", "--fine_tune_epochs", "3", *AUGMENT],
}
LOWRES_SIDE = 32
LOWRES_PER_CLASS = 500
REAL_PER_CLASS = 300


def link_subset(source: Path, target: Path, per_class: int) -> Path:
    """The first `per_class` photos of each class of `source`, as symbolic links in `target`."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True, exist_ok=True)
        for photo in sorted(folder.glob("*.jpg"))[:per_class]:
            link = target / folder.name / photo.name
            if not link.exists():
                link.symlink_to(photo)
    return target


def write_lowres(source: Path, target: Path) -> Path:
    """`source`'s photos shrunk to 32x32 (antialiased) as PNG in `target`, LOWRES_PER_CLASS a class."""
    from PIL import Image

    if (target / ".written").exists():
        return target
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True, exist_ok=True)
        for photo in sorted(folder.glob("*.jpg"))[:LOWRES_PER_CLASS]:
            with Image.open(photo) as image:
                image.convert("RGB").resize((LOWRES_SIDE, LOWRES_SIDE), Image.LANCZOS).save(
                    target / folder.name / f"{photo.stem}.png"
                )
    (target / ".written").touch()
    return target


def run_path(image_dir: Path, work: Path, name: str, flags: list[str]) -> dict:
    out = work / "runs" / image_dir.name / name.replace(" ", "_")
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
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    metrics = out / "metrics.json"
    accuracy = json.loads(metrics.read_text())["accuracy"] if metrics.exists() else None
    return {"accuracy": accuracy, "seconds": seconds, "command": " ".join(command[2:])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_dir", action="append", type=Path, default=None)
    parser.add_argument("--lowres", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".paths")
    parser.add_argument(
        "--data", type=Path, default=DATA, help=f"the shared development data (default {DATA})"
    )
    args = parser.parse_args()
    flowers = args.data / "flowers128"
    folders = args.image_dir or (
        [link_subset(flowers, args.work / f"flowers128_{REAL_PER_CLASS}", REAL_PER_CLASS)]
        if flowers.is_dir()
        else []
    )
    if args.lowres and flowers.is_dir():
        folders.append(write_lowres(flowers, args.work / "flowers32"))
    if not folders:
        sys.exit(f"No photo folder: pass --image_dir (default {flowers} is missing).")
    print("dataset      path          test accuracy  wall time (s)")
    for folder in folders:
        # Fill the cache first, so every path below is timed on a filled cache.
        run_path(folder, args.work, "fill cache", ["--cache_only"])
        results = {name: run_path(folder, args.work, name, flags) for name, flags in PATHS.items()}
        for name, result in results.items():
            gain = result["accuracy"] - results["cached head"]["accuracy"]
            print(
                f"{folder.name:<12} {name:<13} {result['accuracy']:.3f} ({gain:+.3f})"
                f"   {result['seconds']:>8.0f}",
                flush=True,
            )
        for name, result in results.items():
            print(f"  {name}: {result['command']}", flush=True)


if __name__ == "__main__":
    main()
