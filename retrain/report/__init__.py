"""The run's report: report.html, its figures and thumbnails, built from the run's record.

    python -m retrain.report OUTPUT_DIR     (or the `retrain-report` command)

rebuilds OUTPUT_DIR/report.html, training_curves.png, confusion_matrix.png and
reliability.png (calibration, retrain.report.confidence) from what a run saved
there (retrain.evaluation.run_record, label_issues.csv, near_duplicates.csv,
thumbnails/), without the cache, the model or TensorFlow;
`--screenshot FILE.png` also renders the page with headless Chromium.

During a run, `checks.find_data_checks` runs the data checks on the bottleneck
vectors (retrain.evaluation.label_issues and .near_duplicates) and renders
thumbnails of what they found while the head trains; at the end,
`run_report.write_run_report` writes their CSVs and a small JPEG thumbnail of
every image the page shows into OUTPUT_DIR/thumbnails/, then calls `page.build`.
The page is one HTML file with inline CSS and no scripts; it refers only to
files beside it, so it opens from disk in any browser, with no network.

A part that fails (the checks, a CSV, the thumbnails, a figure, the page) is a
warning, never a lost run (retrain.report.report_parts). The folder may come from
someone else: only regular files of bounded size are read from it
(retrain.files.received_files), and every file is written with retrain.files.atomic_write,
so a symbolic link at its name is replaced, never written through.
"""

import importlib

# Public name -> the module defining it, imported on first use (PEP 562): the
# data checks bring scikit-learn and cleanlab, the page matplotlib, and
# `retrain-report --version` or `--help` needs none of them.
_NAMES = {
    "CHECKS_FILE": "checks",
    "DataChecks": "checks",
    "checks_summary": "checks",
    "find_data_checks": "checks",
    "CONFUSION_FILE": "page",
    "CURVES_FILE": "page",
    "REPORT_FILE": "page",
    "build": "page",
    "write_run_report": "run_report",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES))
