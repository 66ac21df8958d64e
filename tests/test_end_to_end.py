"""The real command on real images with the real EfficientNet-Lite0 weights.

scikit-learn's 1,797 handwritten digits, written as 8x8 PNGs by the demo's own
writer, go through `python -m retrain` and `python -m retrain.label_image` as
separate processes, exactly as a user runs them.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrain.data import images

ROOT = Path(__file__).resolve().parents[1]
MIN_DIGITS_ACCURACY = 0.90  # a logistic regression on the same vectors reaches about 0.91


def load_demo_writer():
    spec = importlib.util.spec_from_file_location(
        "make_digits", ROOT / "examples" / "make_digits.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_digits


def run_command(*argv, timeout=900):
    done = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One full run on all ten digit classes; returns its folders and first stdout."""
    base = tmp_path_factory.mktemp("digits")
    image_dir, cache_dir, out_dir = base / "digits", base / "cache", base / "out"
    load_demo_writer()(image_dir)
    done = run_command(
        "retrain",
        "--image_dir",
        str(image_dir),
        "--bottleneck_dir",
        str(cache_dir),
        "--output_dir",
        str(out_dir),
        "--seed",
        "1",
    )
    assert done.returncode == 0, done.stderr
    return image_dir, cache_dir, out_dir, done.stdout


def test_digits_reach_the_logistic_regression_accuracy(digits_run):
    _, _, out_dir, stdout = digits_run
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["accuracy"] >= MIN_DIGITS_ACCURACY, metrics["accuracy"]
    assert "1797 extracted" in stdout
    for name in ("model.keras", "labels.txt", "settings.yaml"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "labels.txt").read_text().split() == [str(d) for d in range(10)]


def test_second_run_extracts_nothing(digits_run, tmp_path):
    image_dir, cache_dir, _, _ = digits_run
    done = run_command(
        "retrain",
        "--image_dir",
        str(image_dir),
        "--bottleneck_dir",
        str(cache_dir),
        "--output_dir",
        str(tmp_path / "again"),
        "--how_many_training_steps",
        "50",
        "--no-report",
    )
    assert done.returncode == 0, done.stderr
    assert "0 extracted, 1797 reused" in done.stdout


def test_label_image_puts_a_training_image_first(digits_run):
    image_dir, _, out_dir, _ = digits_run
    training = images.discover(image_dir).bucket("training")
    chosen = [training[0], training[len(training) // 2], training[-1]]
    done = run_command(
        "retrain.label_image",
        "--graph",
        str(out_dir / "model.keras"),
        "--labels",
        str(out_dir / "labels.txt"),
        "--json",
        "--image",
        *[str(image_dir / entry.relative_path) for entry in chosen],
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    predicted = [result["predictions"][0]["label"] for result in results]
    assert predicted == [entry.label for entry in chosen]


def test_shuffled_labels_fail_the_accuracy_check(digits_run, tmp_path):
    """The accuracy floor above must be able to fail: with labels shuffled it does."""
    image_dir, cache_dir, _, _ = digits_run
    files = sorted(image_dir.glob("*/*.png"))[::4]
    rng = np.random.default_rng(0)
    shuffled = tmp_path / "shuffled"
    for path, label in zip(files, rng.permutation([p.parent.name for p in files])):
        (shuffled / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, shuffled / label / path.name)
    done = run_command(
        "retrain",
        "--image_dir",
        str(shuffled),
        "--bottleneck_dir",
        str(cache_dir),
        "--output_dir",
        str(tmp_path / "out"),
        "--no-report",
    )
    assert done.returncode == 0, done.stderr
    accuracy = json.loads((tmp_path / "out" / "metrics.json").read_text())["accuracy"]
    assert accuracy < MIN_DIGITS_ACCURACY / 2
