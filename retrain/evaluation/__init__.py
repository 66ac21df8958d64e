"""Evaluation of a trained classifier.

    metrics       accuracy, per-class scores, confusion matrix, misclassified images
    run_record    what a run saves for its report (run_record.json, probabilities.npz)
    label_issues     suspicious labels: cross-validated on the bottleneck vectors (cleanlab)
    near_duplicates  near-duplicate image pairs: neighbour search on the bottleneck vectors
    distinct_validation  validation images with no near-copy in training (model selection)
    check_limits     what bounds the checks' cost: images checked, threads, PCA sample
    check_files      the checks' CSVs (label_issues.csv, near_duplicates.csv): write, read back

The names below are the package's public API (from `metrics`). They load on
first use: `metrics` imports scikit-learn (about 1 s), which a --cache_only
run never needs.
"""

import importlib

__all__ = [
    "Evaluation",
    "Mistake",
    "evaluate",
    "misclassified",
    "print_misclassified",
    "summary",
    "write_metrics",
]


def __getattr__(name):
    """`evaluation.evaluate` and the other public names: imports `metrics` when first asked."""
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.metrics"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
