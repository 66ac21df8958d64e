"""The run's figures as PNG files, drawn with matplotlib's Agg backend (no display needed).

* `plot_training_curves`: loss and accuracy against the training step, for the
  training and validation sets, with the step whose weights were kept.
* `plot_confusion_matrix`: rows = true class, columns = predicted class,
  coloured by the share of each true class (row-normalised), classes sorted by
  recall (worst first) so that the problem classes are together at the top.
  The figure grows with the number of classes so that every tick label keeps
  its own line: readable with hundreds of classes. Class names are drawn as
  written (never parsed as mathtext or TeX).
* `plot_reliability`: the reliability diagram of probabilities before and
  after temperature scaling: per confidence bin, the share correct against
  the mean confidence, with each set's expected calibration error.

Files are written with retrain.files.atomic_write: a symbolic link left at a
figure's name in a received output folder is replaced, never written through.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

# Figures are made with the object API on an Agg canvas, never through
# pyplot: no display is needed and no global figure state is kept.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from retrain.files import atomic_write

# Height given to each class row of the confusion matrix, in points; the tick
# label font is smaller than this, so neighbouring labels never overlap.
ROW_POINTS = 11.0
LABEL_POINTS = 8.0
# Counts are written in the cells only while they stay legible.
MAX_CLASSES_WITH_COUNTS = 30
DPI = 100


def plot_training_curves(history: list[dict], path, best_step: int | None = None) -> Path:
    """Writes loss and accuracy against the step to `path` (PNG); returns the path.

    history: one dict per evaluation with step, loss, accuracy, val_loss,
    val_accuracy (the last two None without a validation set), as in
    retrain.training.head.TrainResult.history. An empty history draws empty axes.
    """
    steps = [entry["step"] for entry in history]
    figure = Figure(figsize=(11, 4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for axis, key, title in (
        (axes[0], "loss", "Cross-entropy loss"),
        (axes[1], "accuracy", "Accuracy"),
    ):
        for prefix, label, style in (("", "training", "-"), ("val_", "validation", "-")):
            values = [entry.get(prefix + key) for entry in history]
            if any(value is not None for value in values):
                axis.plot(steps, [np.nan if v is None else v for v in values], style, label=label)
        if best_step:
            axis.axvline(
                best_step,
                color="0.4",
                linestyle="--",
                linewidth=1,
                label=f"kept weights (step {best_step})",
            )
        axis.set_title(title)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(loc="best", fontsize=9)
    if history and any(entry.get("loss") for entry in history):
        axes[0].set_yscale("log")
    return save_png(figure, path)


def save_png(figure: Figure, path) -> Path:
    """Writes the figure as PNG to `path` atomically (a link at `path` is replaced, not followed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write.write_bytes(path, buffer.getvalue())


def recall_order(confusion: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Class indices sorted by recall (worst first), then by name; classes without images last."""
    confusion = np.asarray(confusion)
    support = confusion.sum(axis=1)
    recall = np.divide(
        np.diag(confusion), support, out=np.full(len(support), np.inf), where=support > 0
    )
    return np.array(
        sorted(range(len(class_names)), key=lambda i: (recall[i], class_names[i])), dtype=np.int64
    )


def plot_confusion_matrix(
    confusion: np.ndarray, class_names: list[str], path, title: str = "Confusion matrix (test)"
) -> Path:
    """Writes `draw_confusion_matrix(confusion, class_names, title)` to `path` (PNG)."""
    return save_png(draw_confusion_matrix(confusion, class_names, title), path)


def draw_confusion_matrix(
    confusion: np.ndarray, class_names: list[str], title: str = "Confusion matrix (test)"
) -> Figure:
    """The confusion matrix int [k, k] (rows true, columns predicted) as a Figure on an Agg canvas.

    Cells are coloured by the fraction of the true class; classes are sorted by
    recall, worst first. The figure is sized so that each class gets
    ROW_POINTS of height and width, so labels never overlap.
    """
    confusion = np.asarray(confusion)
    k = len(class_names)
    if confusion.shape != (k, k):
        from retrain.errors import RetrainError

        raise RetrainError(
            f"confusion must be [{k}, {k}] for {k} class names. Received: shape={confusion.shape}"
        )
    order = recall_order(confusion, class_names)
    matrix = confusion[np.ix_(order, order)]
    names = [class_names[i] for i in order]
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)

    label_inches = 0.6 + LABEL_POINTS * 0.55 / 72 * max(len(name) for name in names)
    grid_inches = max(4.0, k * ROW_POINTS / 72)
    size = grid_inches + label_inches + 1.2
    figure = Figure(figsize=(size + 1.0, size), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    # A square-root colour scale: one mistake among many images still shows.
    image = axis.imshow(
        shares,
        cmap="Blues",
        norm=PowerNorm(0.5, vmin=0, vmax=1),
        interpolation="nearest",
        aspect="equal",
    )
    # Class names are folder names, never TeX: drawn as written, so "$\alpha$" or
    # "$\frac{" cannot fail in the mathtext parser (or in LaTeX, under a
    # matplotlibrc with text.usetex).
    plain = {"fontsize": LABEL_POINTS, "parse_math": False, "usetex": False}
    axis.set_xticks(range(k), names, rotation=90, **plain)
    axis.set_yticks(range(k), names, **plain)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class (sorted by recall, worst first)")
    axis.set_title(f"{title}: {int(matrix.sum())} images, colour = share of the true class")
    if k <= MAX_CLASSES_WITH_COUNTS:
        for row in range(k):
            for column in range(k):
                if matrix[row, column]:
                    axis.text(
                        column,
                        row,
                        str(matrix[row, column]),
                        ha="center",
                        va="center",
                        fontsize=LABEL_POINTS,
                        color="white" if shares[row, column] > 0.3 else "black",
                    )
    figure.colorbar(image, ax=axis, shrink=min(1.0, 6 / size), label="share of the true class")
    return figure


def plot_reliability(
    before: np.ndarray, after: np.ndarray, labels: np.ndarray, path, bins: int = 15
) -> Path:
    """Writes the reliability diagram of two sets of probabilities of the same images (PNG).

    before, after: float [n, k] probabilities (uncalibrated, calibrated);
    labels: int [n]. One panel each: a bar per filled confidence bin (`bins`
    equal-width bins of the top probability) at the share correct, a red
    mark at the bin's mean confidence (the gap is its miscalibration), the
    diagonal of perfect calibration, and the expected calibration error in
    the title; a bar's shade grows with the images in its bin.
    """
    from retrain.evaluation import calibration

    figure = Figure(figsize=(10, 4.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    for axis, probabilities, title in (
        (axes[0], before, "Before calibration"),
        (axes[1], after, "After calibration"),
    ):
        table = calibration.reliability_bins(probabilities, labels, bins)
        ece = calibration.expected_calibration_error(probabilities, labels, bins)
        filled = table["count"] > 0
        centres = (table["edges"][:-1] + table["edges"][1:]) / 2
        shade = 0.25 + 0.75 * table["count"] / max(int(table["count"].max()), 1)
        axis.bar(
            centres[filled],
            table["accuracy"][filled],
            width=1 / bins,
            color=[(0.36, 0.55, 0.94, alpha) for alpha in shade[filled]],
            edgecolor="0.3",
            linewidth=0.5,
            label="share correct",
        )
        # The gap between a bar's top and its marker is the bin's miscalibration.
        axis.plot(
            centres[filled],
            table["confidence"][filled],
            "_",
            color="#b4401b",
            markersize=270 / bins,
            markeredgewidth=2.5,
            label="mean confidence",
        )
        axis.plot([0, 1], [0, 1], "--", color="0.4", linewidth=1, label="perfect calibration")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_title(f"{title}: ECE {ece:.3f} ({int(table['count'].sum())} images)")
        axis.set_xlabel("confidence (top probability)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("share correct")
    axes[0].legend(loc="upper left", fontsize=9)
    return save_png(figure, path)
