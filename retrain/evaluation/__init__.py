"""Evaluation of a trained classifier.

    metrics       accuracy, per-class scores, confusion matrix, misclassified images
    run_record    what a run saves for its report (run_record.json, probabilities.npz)
    data_checks   suspicious labels and near-duplicates from the bottleneck vectors

The names below are the package's public API (from `metrics`).
"""

from retrain.evaluation.metrics import (
    Evaluation,
    Mistake,
    evaluate,
    misclassified,
    print_misclassified,
    summary,
    write_metrics,
)

__all__ = [
    "Evaluation",
    "Mistake",
    "evaluate",
    "misclassified",
    "print_misclassified",
    "summary",
    "write_metrics",
]
