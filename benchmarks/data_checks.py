"""Do the data checks find planted label errors and planted near-duplicates in real photos?

    python benchmarks/data_checks.py --source ../shared/data/caltech101 [--classes 17]
        [--per_class 80] [--errors 12] [--duplicates 8] [--seed 0]
        [--bottleneck_dir cache] [--work FOLDER]

Copies `--classes` classes (at most `--per_class` photos each, pooled from any
train/test sub-folders) of `--source` into a new folder, then plants:

* `--errors` label errors: photos moved into another, randomly chosen class folder;
* `--duplicates` near-duplicates: photos resized to 60-85% of their size and
  re-encoded as JPEG at quality 70-90 under a new name in the same class folder
  (the split hashes the new name, so a copy often lands in another bucket).

It then runs `python -m retrain` on the copy and reports how many planted errors
are in the top 3 x errors rows of label_issues.csv and how many planted pairs in
the top 3 x duplicates rows of near_duplicates.csv, with the run's time. What
was planted is listed in WORK/planted.json. The source folder is never modified.
"""

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EXTENSIONS = {".jpg", ".jpeg", ".png"}


def class_photos(source: Path) -> dict[str, list[Path]]:
    """Photos per class under source/<class>/ or source/{train,test}/<class>/."""
    roots = [source / name for name in ("train", "test") if (source / name).is_dir()] or [source]
    photos: dict[str, list[Path]] = {}
    for root in roots:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            photos.setdefault(folder.name, []).extend(
                sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
            )
    return photos


def plant(
    source: Path, dest: Path, classes: int, per_class: int, errors: int, duplicates: int, seed: int
) -> tuple[list[str], list[tuple[str, str]]]:
    """Writes the planted copy; returns moved images and (original, copy) pairs, relative to dest."""
    rng = random.Random(seed)
    photos = class_photos(source)
    eligible = sorted(name for name, files in photos.items() if len(files) >= per_class // 2)
    chosen = sorted(rng.sample(eligible, min(classes, len(eligible))))
    copied: list[str] = []
    for name in chosen:
        (dest / name).mkdir(parents=True)
        files = photos[name]
        for index, path in enumerate(rng.sample(files, min(per_class, len(files)))):
            relative = f"{name}/{name}_{index:04d}{path.suffix.lower()}"
            shutil.copyfile(path, dest / relative)
            copied.append(relative)
    picked = rng.sample(copied, errors + duplicates)
    moved = []
    for relative in picked[:errors]:
        given = relative.split("/")[0]
        target = rng.choice([name for name in chosen if name != given])
        new = f"{target}/moved_{Path(relative).name}"
        (dest / relative).rename(dest / new)
        moved.append(new)
    pairs = []
    for index, relative in enumerate(picked[errors:]):
        with Image.open(dest / relative) as image:
            image = image.convert("RGB")
            scale = rng.uniform(0.6, 0.85)
            small = image.resize(
                (max(8, round(image.width * scale)), max(8, round(image.height * scale))),
                Image.LANCZOS,
            )
        copy = f"{relative.split('/')[0]}/copy_{index:02d}.jpg"
        small.save(dest / copy, quality=rng.randint(70, 90))
        pairs.append((relative, copy))
    return moved, pairs


def score(out_dir: Path, moved: list[str], pairs: list[tuple[str, str]]) -> dict:
    with open(out_dir / "label_issues.csv", newline="", encoding="utf-8") as handle:
        issues = [row["image"] for row in csv.DictReader(handle)]
    with open(out_dir / "near_duplicates.csv", newline="", encoding="utf-8") as handle:
        found = [frozenset((row["image_a"], row["image_b"])) for row in csv.DictReader(handle)]
    top_issues, top_pairs = 3 * len(moved), 3 * len(pairs)
    return {
        "errors_found": sum(path in issues[:top_issues] for path in moved),
        "errors_anywhere": sum(path in issues for path in moved),
        "issue_rows": len(issues),
        "top_issues": top_issues,
        "pairs_found": sum(frozenset(pair) in found[:top_pairs] for pair in pairs),
        "pairs_anywhere": sum(frozenset(pair) in found for pair in pairs),
        "pair_rows": len(found),
        "top_pairs": top_pairs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SHARED / "caltech101")
    parser.add_argument("--classes", type=int, default=17)
    parser.add_argument("--per_class", type=int, default=80)
    parser.add_argument("--errors", type=int, default=12)
    parser.add_argument("--duplicates", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bottleneck_dir", default="cache")
    parser.add_argument(
        "--work", type=Path, help="folder for the planted copy and the run (default: temporary)"
    )
    args = parser.parse_args()
    if not args.source.is_dir():
        print(
            f"data_checks: error: no such folder. Received: --source {args.source}", file=sys.stderr
        )
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="retrain-data-checks-"))
    image_dir, out_dir = work / "images", work / "output"
    if image_dir.exists():
        shutil.rmtree(image_dir)
    moved, pairs = plant(
        args.source,
        image_dir,
        args.classes,
        args.per_class,
        args.errors,
        args.duplicates,
        args.seed,
    )
    (work / "planted.json").write_text(json.dumps({"moved": moved, "pairs": pairs}, indent=1))
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "retrain",
            "--image_dir",
            str(image_dir),
            "--bottleneck_dir",
            args.bottleneck_dir,
            "--output_dir",
            str(out_dir),
            "--seed",
            str(args.seed),
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return 1
    result = score(out_dir, moved, pairs)
    checks = [line for line in done.stdout.splitlines() if line.startswith("Data checks")]
    print(
        f"{args.source.name}: {args.classes} classes, seed {args.seed}, run {seconds:.0f} s; "
        + " ".join(checks)
    )
    print(
        f"  label errors: {result['errors_found']}/{len(moved)} in the top {result['top_issues']} "
        f"rows of label_issues.csv ({result['errors_anywhere']} anywhere in {result['issue_rows']} rows)"
    )
    print(
        f"  duplicates:   {result['pairs_found']}/{len(pairs)} in the top {result['top_pairs']} "
        f"rows of near_duplicates.csv ({result['pairs_anywhere']} anywhere in {result['pair_rows']} rows)"
    )
    print(f"  output: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
