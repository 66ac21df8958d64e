"""Scores of a trained classifier: metrics, confusion matrix, misclassified images.

`evaluate` turns predicted probabilities and true labels into an `Evaluation`
(scikit-learn computes the metrics); `summary` renders it for stdout and
`write_metrics` writes it to the output folder as metrics.json and
confusion_matrix.csv; `misclassified` lists the wrong predictions. The figures
(retrain.report.figures) and the HTML page (retrain.report) use the same
`Evaluation` and `Mistake`s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn import metrics

from retrain import console
from retrain.errors import RetrainError
from retrain.files import atomic_write, text_escapes
from retrain.files.text_escapes import one_line


@dataclass
class Evaluation:
    """Metrics of predictions on one set of images.

    Per-class arrays are float64 [k] (support int64 [k]) in class_names order;
    confusion is int64 [k, k], rows = true class, columns = predicted class.
    """

    class_names: list[str]
    accuracy: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    confusion: np.ndarray

    @property
    def count(self) -> int:
        return int(self.support.sum())

    def to_dict(self) -> dict:
        """JSON-ready form: accuracy, count, per_class metrics, confusion_matrix."""
        return {
            "accuracy": self.accuracy,
            "count": self.count,
            "per_class": {
                name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for name, p, r, f, s in zip(
                    self.class_names, self.precision, self.recall, self.f1, self.support
                )
            },
            "confusion_matrix": self.confusion.tolist(),
        }


def evaluate(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str]) -> Evaluation:
    """Scores predictions against true labels.

    Args:
      probabilities: float [n, k] class probabilities (or any scores: the
        arg-max is the prediction), k = len(class_names), n >= 1.
      labels: int [n] true class indices in [0, k).
      class_names: the k class names in output order.

    Raises:
      RetrainError for mismatched shapes or labels out of range.
    """
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels)
    k = len(class_names)
    if (
        probabilities.ndim != 2
        or probabilities.shape[1] != k
        or labels.shape != probabilities.shape[:1]
    ):
        raise RetrainError(
            f"probabilities must be [n, {k}] (one column per class) and labels [n]. "
            f"Received: probabilities.shape={probabilities.shape}, labels.shape={labels.shape}"
        )
    if not len(labels):
        raise RetrainError("Nothing to evaluate: no images. Received: labels.shape=(0,)")
    if labels.min() < 0 or labels.max() >= k:
        raise RetrainError(
            f"labels must be class indices in [0, {k}). "
            f"Received: range=[{labels.min()}, {labels.max()}]"
        )
    predicted = probabilities.argmax(axis=1)
    classes = np.arange(k)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    return Evaluation(
        class_names=list(class_names),
        accuracy=float(metrics.accuracy_score(labels, predicted)),
        precision=precision,
        recall=recall,
        f1=f1,
        support=support.astype(np.int64),
        confusion=metrics.confusion_matrix(labels, predicted, labels=classes).astype(np.int64),
    )


def summary(evaluation: Evaluation) -> str:
    """Plain-text accuracy and per-class table, for stdout."""
    width = max(len("class"), *(len(name) for name in evaluation.class_names))
    lines = [
        f"Final test accuracy = {100 * evaluation.accuracy:.1f}% (N={evaluation.count})",
        f"{'class':<{width}}  precision  recall     f1  support",
    ]
    for name, p, r, f, s in zip(
        evaluation.class_names,
        evaluation.precision,
        evaluation.recall,
        evaluation.f1,
        evaluation.support,
    ):
        lines.append(f"{name:<{width}}  {p:9.3f}  {r:6.3f}  {f:5.3f}  {s:7d}")
    return "\n".join(lines)


class Mistake(NamedTuple):
    """A misclassified image: its relative path, true and predicted class, and the
    probability of the predicted class."""

    image: str
    true: str
    predicted: str
    confidence: float


def misclassified(probabilities: np.ndarray, entries, class_names: list[str]) -> list[Mistake]:
    """The images predicted wrongly, in `entries` order.

    probabilities: float [n, k]; entries: n objects with `relative_path` and
    `label_index` (retrain.data.images.ImageEntry, run_record.RecordedImage),
    in the same order.
    """
    predicted = np.asarray(probabilities).argmax(axis=1)
    return [
        Mistake(
            entry.relative_path,
            class_names[entry.label_index],
            class_names[guess],
            float(probabilities[row, guess]),
        )
        for row, (entry, guess) in enumerate(zip(entries, predicted))
        if guess != entry.label_index
    ]


def print_misclassified(wrong: list[Mistake]) -> None:
    """Prints misclassified images to stdout like retrain.py: path, then predicted class."""
    console.result("=== MISCLASSIFIED TEST IMAGES ===")
    for relative_path, true, predicted, score in wrong:
        # one_line: a path with undecodable bytes would stop a strict UTF-8 stdout.
        console.result(f"{one_line(relative_path):>70}  {predicted} ({score:.3f}, true: {true})")


def write_metrics(
    evaluation: Evaluation,
    output_dir,
    misclassified: list[Mistake] = (),
    confidence: dict | None = None,
) -> dict[str, Path]:
    """Writes metrics.json and confusion_matrix.csv into output_dir; returns their paths.

    misclassified: `Mistake`s (or equal tuples), listed in
    metrics.json under "misclassified" (paths as `text_escapes.one_line`).
    confidence: None, or a dict with "calibration" and/or "unknown"
    (retrain.evaluation.confidence_metrics' calibration_summary and
    unknown_summary), written as top-level keys of metrics.json.
    Both files replace any file or link at their names (atomic_write).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "confusion_matrix": out / "confusion_matrix.csv"}
    document = evaluation.to_dict()
    document["misclassified"] = [
        {"path": one_line(path), "true": true, "predicted": predicted, "score": score}
        for path, true, predicted, score in misclassified
    ]
    for key in ("calibration", "unknown"):
        if confidence and confidence.get(key) is not None:
            document[key] = confidence[key]
    atomic_write.write_text(paths["metrics"], json.dumps(document, indent=2) + "\n")
    # Class names may start like a formula (a class "=1+2"): csv_rows quotes them.
    rows = (
        [name, *row.tolist()] for name, row in zip(evaluation.class_names, evaluation.confusion)
    )
    atomic_write.write_text(
        paths["confusion_matrix"],
        text_escapes.csv_rows(["true \\ predicted", *evaluation.class_names], rows),
    )
    return paths
