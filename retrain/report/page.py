"""report.html and its figures, built from the run's record in an output folder.

`build` draws training_curves.png, confusion_matrix.png and (from records
of issue 24 on) reliability.png and renders
report.html.j2 from what a run saved (retrain.evaluation.run_record, the
data checks' CSVs, thumbnails/), without the cache, the model or TensorFlow.
The page is one HTML file with inline CSS and no scripts; it refers only to
files beside it, so it opens from disk in any browser, with no network.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from retrain.evaluation import check_files, run_record
from retrain.evaluation.distinct_validation import optimism
from retrain.evaluation.metrics import Evaluation, Mistake, evaluate, misclassified
from retrain.files import atomic_write, received_files
from retrain.files.text_escapes import utf8
from retrain.report import confidence, figures
from retrain.report.checks import SHOWN_DUPLICATES, SHOWN_LABEL_ISSUES, read_checks
from retrain.report.report_parts import ReportParts
from retrain.report.thumbnails import THUMBNAIL_DIR, thumbnail_path

REPORT_FILE = "report.html"
CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrix.png"
# How many misclassified test images get thumbnails on the page; metrics.json holds all.
SHOWN_MISCLASSIFIED = 60


def misclassified_tests(record: run_record.RunRecord) -> list[Mistake]:
    """The test images the head got wrong, most confident mistakes first."""
    probabilities = record.probabilities.get("testing")
    entries = record.entries("testing")
    if probabilities is None or not entries:
        return []
    return sorted(
        misclassified(probabilities, entries, record.class_names),
        key=lambda mistake: -mistake.confidence,
    )


def _evaluations(record) -> dict[str, Evaluation]:
    result = {}
    for split in run_record.EVALUATED_SPLITS:
        rows = record.rows(split)
        if len(rows) and split in record.probabilities:
            result[split] = evaluate(
                record.probabilities[split], record.labels[rows], record.class_names
            )
    return result


def distinct_accuracy(record: run_record.RunRecord) -> dict | None:
    """Validation accuracy on all images and on those with no near-copy in training.

    None when the record has no distinct-validation data (a run from before
    it), no validation probabilities or no distinct image. Otherwise a dict:
    accuracy, count (distinct images), total, plain (accuracy on all),
    threshold, used (whether model selection used them), note (the
    `distinct_validation.optimism` sentence, or "").
    """
    mask = record.distinct_mask()
    probabilities = record.probabilities.get("validation")
    if mask is None or probabilities is None or not mask.any():
        return None
    hits = probabilities.argmax(axis=1) == record.labels[record.rows("validation")]
    accuracy, plain = float(hits[mask].mean()), float(hits.mean())
    return {
        "accuracy": accuracy,
        "count": int(mask.sum()),
        "total": len(mask),
        "plain": plain,
        "threshold": float(record.distinct_validation["threshold"]),
        "used": bool(record.distinct_validation.get("used")),
        "note": optimism(plain, accuracy),
    }


def class_table(record, evaluations) -> list[dict]:
    """One row per class: counts per split, class weight, metrics per evaluated split.

    Rows follow the confusion matrix's order (recall on test, worst first).
    """
    counts = record.counts()
    reference = evaluations.get("testing") or evaluations.get("validation")
    order = (
        figures.recall_order(reference.confusion, record.class_names)
        if reference
        else np.arange(len(record.class_names))
    )
    largest = max(int(counts[:, 0].max()), 1)
    rows = []
    for index in order:
        rows.append(
            {
                "name": record.class_names[index],
                "training": int(counts[index, 0]),
                "validation": int(counts[index, 1]),
                "testing": int(counts[index, 2]),
                "total": int(counts[index].sum()),
                "bar": round(100 * counts[index, 0] / largest, 1),
                "weight": None if record.class_weights is None else record.class_weights[index],
                "metrics": {
                    split: {
                        "precision": result.precision[index],
                        "recall": result.recall[index],
                        "f1": result.f1[index],
                        "support": int(result.support[index]),
                    }
                    for split, result in evaluations.items()
                },
            }
        )
    return rows


def build(output_dir, parts: ReportParts | None = None) -> Path:
    """Draws the figures and writes report.html from the record in output_dir; returns its path.

    A figure that cannot be drawn is a warning recorded in `parts` (a new
    ReportParts when None) and the page is written without it. Every file is
    written with atomic_write: a link left at its name is replaced, never
    written through; only regular files of bounded size are read.

    Raises:
      RetrainError when output_dir holds no readable run record or holds
      data-check files retrain did not write; OSError when the page itself
      cannot be written.
    """
    out = Path(output_dir)
    parts = ReportParts() if parts is None else parts
    record = run_record.load(out)
    evaluations = _evaluations(record)
    issues, duplicates, checks_sample = read_checks(out)
    curves = confusion = None
    with parts.part(CURVES_FILE):
        figures.plot_training_curves(record.history, out / CURVES_FILE, record.best_step)
        curves = CURVES_FILE if record.history else None
    confusion_split = "testing" if "testing" in evaluations else "validation"
    if confusion_split in evaluations:
        with parts.part(CONFUSION_FILE):
            figures.plot_confusion_matrix(
                evaluations[confusion_split].confusion,
                record.class_names,
                out / CONFUSION_FILE,
                title=f"Confusion matrix ({'test' if confusion_split == 'testing' else 'validation'})",
            )
            confusion = CONFUSION_FILE
    calibrated = confidence.calibration_view(record, out, parts)
    unknown = confidence.unknown_view(record, parts)
    thumbnails_linked = os.path.islink(out / THUMBNAIL_DIR)

    def thumbnail(image):
        relative = thumbnail_path(image)
        usable = not thumbnails_linked and received_files.is_regular(out / relative)
        return relative if usable else None

    page = _render_page(
        record=record,
        evaluations=evaluations,
        curves=curves,
        confusion=confusion,
        confusion_split=confusion_split,
        issues=issues,
        duplicates=duplicates,
        checks_sample=checks_sample,
        thumbnail=thumbnail,
        calibrated=calibrated,
        unknown=unknown,
    )
    return atomic_write.write_text(out / REPORT_FILE, page)


def _render_page(record, evaluations, issues, duplicates, **values) -> str:
    """report.html.j2 rendered with the run's values (autoescaped HTML)."""
    import jinja2

    counts = record.counts()
    training_counts = counts[:, 0][counts[:, 0] > 0]
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("retrain.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        # Every text value on the page as UTF-8 can hold it: a settings value
        # with a name that is not UTF-8 (a lone surrogate) shows as \xNN.
        finalize=lambda value: utf8(value) if type(value) is str else value,
    )
    return environment.get_template("report.html.j2").render(
        record=record,
        generated=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        evaluations=evaluations,
        split_totals=counts.sum(axis=0).tolist(),
        imbalance=(int(training_counts.max()) / int(training_counts.min()))
        if len(training_counts)
        else 1.0,
        classes=class_table(record, evaluations),
        mistakes=misclassified_tests(record),
        distinct=distinct_accuracy(record),
        shown_mistakes=SHOWN_MISCLASSIFIED,
        issues=issues,
        shown_issues=SHOWN_LABEL_ISSUES,
        duplicates=duplicates,
        shown_duplicates=SHOWN_DUPLICATES,
        straddling=sum(pair.straddles_splits for pair in duplicates or []),
        files={
            "issues": check_files.LABEL_ISSUES_FILE,
            "duplicates": check_files.NEAR_DUPLICATES_FILE,
        },
        **values,
    )
