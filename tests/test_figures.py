"""The PNG figures: valid images, sorted classes, tick labels that never overlap."""

import numpy as np
import pytest
from PIL import Image

from retrain.errors import RetrainError
from retrain.report import figures

HISTORY = [
    {
        "step": 10 * (i + 1),
        "learning_rate": 0.003,
        "loss": 2.0 / (i + 1),
        "accuracy": 0.5 + i / 40,
        "val_loss": 2.2 / (i + 1),
        "val_accuracy": 0.45 + i / 40,
    }
    for i in range(20)
]


def assert_png(path, min_side=200):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5, "the figure is blank"
    return pixels.shape


def test_training_curves_png(tmp_path):
    assert_png(figures.plot_training_curves(HISTORY, tmp_path / "curves.png", best_step=150))


def test_training_curves_without_validation(tmp_path):
    history = [{**entry, "val_loss": None, "val_accuracy": None} for entry in HISTORY]
    assert_png(figures.plot_training_curves(history, tmp_path / "curves.png"))


def test_recall_order_puts_the_worst_class_first():
    confusion = np.array([[5, 0, 0], [3, 1, 0], [1, 0, 3]])  # recalls 1.0, 0.25, 0.75
    assert figures.recall_order(confusion, ["a", "b", "c"]).tolist() == [1, 2, 0]


@pytest.mark.parametrize("k", [3, 120])
def test_confusion_matrix_png_labels_do_not_overlap(tmp_path, k):
    rng = np.random.default_rng(0)
    names = [f"class_{i:03d}_{'long_name' if i % 7 == 0 else 'x'}" for i in range(k)]
    confusion = np.diag(rng.integers(5, 30, k)) + rng.poisson(0.3, (k, k))
    path = figures.plot_confusion_matrix(confusion, names, tmp_path / "confusion.png")
    height, width = assert_png(path)
    if k > 100:
        assert height > 1500 and width > 1500, "the figure must grow with the classes"
    figure = figures.draw_confusion_matrix(confusion, names)
    figure.canvas.draw()  # lay out as savefig does
    axis, renderer = figure.axes[0], figure.canvas.get_renderer()
    for ticks, coordinate in ((axis.get_yticklabels(), 1), (axis.get_xticklabels(), 0)):
        assert len(ticks) == k
        boxes = sorted(
            (
                box.get_points()[:, coordinate]
                for box in (tick.get_window_extent(renderer) for tick in ticks)
            ),
            key=lambda b: b[0],
        )
        for (_, high), (next_low, _) in zip(boxes, boxes[1:]):
            assert high <= next_low + 0.01, "tick labels overlap"
    order = figures.recall_order(confusion, names)
    assert [tick.get_text() for tick in axis.get_yticklabels()] == [names[i] for i in order]


def test_confusion_matrix_shape_is_checked(tmp_path):
    with pytest.raises(RetrainError, match=r"shape=\(2, 2\)"):
        figures.plot_confusion_matrix(np.eye(2), ["a", "b", "c"], tmp_path / "c.png")


def test_reliability_diagram_png(tmp_path):
    # An overconfident model: 0.95 sure and right 70% of the time; calibrated, 0.7 sure.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    predicted = np.where(rng.random(400) < 0.7, labels, (labels + 1) % 3)
    sure = np.full((400, 3), 0.025)
    sure[np.arange(400), predicted] = 0.95
    calibrated = np.full((400, 3), 0.15)
    calibrated[np.arange(400), predicted] = 0.7
    path = figures.plot_reliability(sure, calibrated, labels, tmp_path / "reliability.png")
    height, width = assert_png(path)
    assert width > height
