"""The report of a real run: planted mistakes found, figures valid, every image of the page resolving.

scikit-learn's digits (six classes, written as PNGs by the demo's writer) get
planted label errors (images moved into another class folder) and planted
near-duplicates (an image re-encoded as JPEG under a new name; the 8x8
digits are too small to shrink),
then go through `python -m retrain` with the real EfficientNet-Lite0 weights.
"""

import csv
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics
from test_end_to_end import load_demo_writer, run_command
from test_figures import assert_png

from retrain import report
from retrain.report import page_screenshot, thumbnails

MOVED = [
    ("0", 3, "4"),
    ("1", 10, "0"),
    ("2", 17, "5"),
    ("3", 25, "1"),
    ("4", 31, "2"),
    ("5", 40, "3"),
]
COPIED = [("0", 7), ("2", 12), ("3", 33), ("5", 21)]


def plant(image_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Moves and copies images as MOVED and COPIED say; returns their relative paths."""
    moved, pairs = [], []
    for source, index, target in MOVED:
        path = sorted((image_dir / source).glob("*.png"))[index]
        path.rename(image_dir / target / f"moved_{path.name}")
        moved.append(f"{target}/moved_{path.name}")
    for folder, index in COPIED:
        path = sorted((image_dir / folder).glob("digit_*.png"))[index]
        with Image.open(path) as image:
            image.convert("RGB").save(image_dir / folder / f"copy_{path.stem}.jpg", quality=90)
        pairs.append((f"{folder}/{path.name}", f"{folder}/copy_{path.stem}.jpg"))
    return moved, pairs


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("planted")
    image_dir, cache_dir, out_dir = base / "digits", base / "cache", base / "out"
    load_demo_writer()(image_dir, classes=range(6), per_class=70)
    moved, pairs = plant(image_dir)
    done = run_command(
        "retrain",
        "--image_dir",
        str(image_dir),
        "--bottleneck_dir",
        str(cache_dir),
        "--output_dir",
        str(out_dir),
        "--how_many_training_steps",
        "400",
    )
    assert done.returncode == 0, done.stderr
    return {
        "image_dir": image_dir,
        "cache_dir": cache_dir,
        "out": out_dir,
        "moved": moved,
        "pairs": pairs,
        "stdout": done.stdout,
    }


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_planted_label_errors_lead_label_issues(planted_run):
    rows = read_csv(planted_run["out"] / "label_issues.csv")
    assert list(rows[0]) == ["image", "given", "suggested", "score"]
    top = [row["image"] for row in rows[: 2 * len(MOVED)]]
    # Some handwritten digits are ambiguous (a 2 that looks like the 5 it was
    # moved to): as in the 9-of-12 floor on photos, most must lead, not all.
    found = [path for path in planted_run["moved"] if path in top]
    assert len(found) >= len(MOVED) - 1, (planted_run["moved"], top)
    by_image = {row["image"]: row for row in rows}
    for (source, _, target), path in zip(MOVED, planted_run["moved"]):
        if path in found:
            assert by_image[path]["given"] == target and by_image[path]["suggested"] == source
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores)


def test_planted_duplicates_lead_near_duplicates(planted_run):
    rows = read_csv(planted_run["out"] / "near_duplicates.csv")
    assert list(rows[0]) == ["image_a", "image_b", "split_a", "split_b", "distance"]
    top = {frozenset((row["image_a"], row["image_b"])) for row in rows[: 2 * len(COPIED)]}
    assert {frozenset(pair) for pair in planted_run["pairs"]} <= top
    distances = [float(row["distance"]) for row in rows]
    assert distances == sorted(distances)
    image_dir = planted_run["image_dir"]
    for row in rows:  # paths relative to --image_dir; splits are the run's buckets
        assert (image_dir / row["image_a"]).is_file() and (image_dir / row["image_b"]).is_file()
        assert {row["split_a"], row["split_b"]} <= {"training", "validation", "testing"}
    assert "Data checks:" in planted_run["stdout"]


def test_metrics_match_scikit_learn_on_the_saved_probabilities(planted_run):
    out = planted_run["out"]
    record = json.loads((out / "run_record.json").read_text())
    labels = np.array([image["label"] for image in record["images"] if image["split"] == "testing"])
    with np.load(out / "probabilities.npz") as archive:
        predicted = archive["testing"].argmax(axis=1)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(metrics.accuracy_score(labels, predicted))
    f1 = metrics.f1_score(labels, predicted, average=None, labels=range(6), zero_division=0)
    assert [saved["per_class"][name]["f1"] for name in record["class_names"]] == pytest.approx(f1)
    assert saved["accuracy"] > 0.85
    # Calibration and the unknown detector: the figures of the run, per class.
    assert 0 <= saved["calibration"]["ece_after"] <= saved["calibration"]["ece_before"] + 0.02
    assert saved["calibration"]["images"] == len(labels)
    assert [row["class"] for row in saved["unknown"]["per_class"]] == record["class_names"]
    assert saved["unknown"]["validation_unknown_share"] <= 1 - saved["unknown"]["acceptance"] + 1e-9
    with np.load(out / "probabilities.npz") as archive:
        assert archive["testing_unknown_score"].shape == labels.shape
    assert "Calibration: temperature" in planted_run["stdout"]
    assert "Unknown: threshold" in planted_run["stdout"]


class PageLinks(HTMLParser):
    """Collects every img src and every local a href of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])


def page_links(out: Path) -> PageLinks:
    parser = PageLinks()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    return parser


def test_every_image_of_the_page_resolves(planted_run):
    out = planted_run["out"]
    links = page_links(out)
    assert "training_curves.png" in links.images and "confusion_matrix.png" in links.images
    thumbnails = [src for src in links.images if src.startswith("thumbnails/")]
    # misclassified, label issues, two per duplicate pair, with repeats removed
    assert len(set(thumbnails)) >= len(MOVED) + len(COPIED)
    for src in links.images + links.links:
        assert "://" not in src and not src.startswith("/"), f"{src} is not beside the page"
        assert (out / src).is_file(), f"{src} does not resolve"
    for src in set(links.images):
        with Image.open(out / src) as image:
            image.verify()
    assert_png(out / "training_curves.png")
    assert_png(out / "confusion_matrix.png")
    assert_png(out / "reliability.png")
    assert "reliability.png" in links.images
    page = (out / "report.html").read_text(encoding="utf-8")
    for heading in (
        "Calibration",
        "Unknown pictures",
        "Most unknown-looking test images",
        "Classes and splits",
        "Settings",
        "Confusion matrix",
        "Per-class precision",
        "Misclassified test images",
        "Suspicious labels",
        "Near-duplicate images",
    ):
        assert heading in page
    for moved in planted_run["moved"]:
        assert moved in page


def test_report_command_rebuilds_the_page_from_the_output_folder(planted_run, tmp_path):
    import shutil

    copy = tmp_path / "moved_output"
    shutil.copytree(planted_run["out"], copy)
    for name in ("report.html", "training_curves.png", "confusion_matrix.png"):
        (copy / name).unlink()
    # The record alone: no image folder, no cache.
    done = subprocess.run(
        [sys.executable, "-m", "retrain.report", str(copy)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert "tensorflow" not in done.stderr.lower()
    original = (planted_run["out"] / "report.html").read_text(encoding="utf-8").splitlines()
    rebuilt = (copy / "report.html").read_text(encoding="utf-8").splitlines()
    differing = [(a, b) for a, b in zip(original, rebuilt) if a != b]
    # Only the "built <time>" line may differ (not at all within the same minute).
    assert len(original) == len(rebuilt) and all("built" in line for line, _ in differing)
    assert_png(copy / "confusion_matrix.png")


def test_the_page_says_when_the_checks_saw_a_sample(planted_run, tmp_path):
    checks = json.loads((planted_run["out"] / report.CHECKS_FILE).read_text(encoding="utf-8"))
    images = len(json.loads((planted_run["out"] / "run_record.json").read_text())["images"])
    assert (checks["checked"], checks["total"]) == (images, images)
    assert "random sample" not in (planted_run["out"] / "report.html").read_text(encoding="utf-8")
    assert "random sample" not in planted_run["stdout"]

    copy = tmp_path / "sampled"
    shutil.copytree(planted_run["out"], copy)
    (copy / report.CHECKS_FILE).write_text(json.dumps({**checks, "total": 100_000}))
    page = report.build(copy).read_text(encoding="utf-8")
    note = f"among a random sample of {images:,} of the 100,000 images"
    assert page.count(note) == 2  # the label issues and the near-duplicates sections


@pytest.mark.parametrize(
    "folder, message",
    [
        ("missing", "No such output folder"),
        ("empty", "has no run_record.json"),
    ],
)
def test_report_command_on_a_bad_folder_says_what_is_wrong(tmp_path, folder, message):
    (tmp_path / "empty").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "retrain.report", str(tmp_path / folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_no_report_skips_page_and_checks_and_balanced_weights_are_recorded(planted_run, tmp_path):
    out = tmp_path / "out"
    done = run_command(
        "retrain",
        "--image_dir",
        str(planted_run["image_dir"]),
        "--bottleneck_dir",
        str(planted_run["cache_dir"]),
        "--output_dir",
        str(out),
        "--how_many_training_steps",
        "50",
        "--no-report",
        "--class_weights",
        "balanced",
        "--print_misclassified_test_images",
    )
    assert done.returncode == 0, done.stderr
    for name in (
        "report.html",
        "label_issues.csv",
        "near_duplicates.csv",
        "confusion_matrix.png",
        "thumbnails",
    ):
        assert not (out / name).exists(), name
    assert "=== MISCLASSIFIED TEST IMAGES ===" in done.stdout and "Data checks" not in done.stdout
    record = json.loads((out / "run_record.json").read_text())
    counts = np.bincount(
        [image["label"] for image in record["images"] if image["split"] == "training"]
    )
    weights = np.array(record["class_weights"])
    np.testing.assert_allclose(weights * counts, counts.sum() / len(counts))  # n / (k * n_c)


def test_a_rerun_with_the_same_images_reuses_the_data_checks(planted_run, tmp_path):
    """Only a training setting changes: the checks' files come back byte for byte from
    the previous run, and the thumbnails of their top rows are there."""
    out = tmp_path / "out"
    shutil.copytree(planted_run["out"], out)
    before = {
        name: (out / name).read_bytes()
        for name in ("label_issues.csv", "near_duplicates.csv", "data_checks.json")
    }
    done = run_command(
        "retrain",
        "--image_dir",
        str(planted_run["image_dir"]),
        "--bottleneck_dir",
        str(planted_run["cache_dir"]),
        "--output_dir",
        str(out),
        "--how_many_training_steps",
        "60",
    )
    assert done.returncode == 0, done.stderr
    assert "reused from the previous run" in done.stdout
    assert "reused from the previous run" not in planted_run["stdout"]
    for name, content in before.items():
        assert (out / name).read_bytes() == content, name
    for name in ("label_issues.csv", "near_duplicates.csv"):
        for row in read_csv(out / name)[:5]:
            for image in [value for key, value in row.items() if key.startswith("image")]:
                assert (out / thumbnails.thumbnail_path(image)).is_file(), image


@pytest.mark.skipif(
    page_screenshot.find_chromium() is None,
    reason="Chromium is not installed (Debian/Ubuntu: apt-get install chromium)",
)
def test_chromium_renders_the_page(planted_run, tmp_path):
    png = page_screenshot.screenshot(
        planted_run["out"] / "report.html", tmp_path / "report.png", width=1280, height=2400
    )
    with Image.open(png) as image:
        assert image.size == (1280, 2400)
        pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    # Not blank: text, figures and thumbnails give many colours and strong contrast.
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 500
    # The first thumbnail row or figure makes the top of the page non-uniform too.
    assert pixels[:600].std() > 10
