"""The page's calibration and unknown sections, from a run record of issue 24 on.

`calibration_view` draws the reliability diagram (before and after
temperature scaling) of the test images; `unknown_view` gives the detector's
threshold, per class the test precision at it and the validation and test
images called unknown (retrain.evaluation.confidence_metrics), and the most
unknown-looking test images. A record from before them has neither: the page
then shows no such section. Each part that fails is one warning naming it
(retrain.report.report_parts), never a lost page.
"""

from __future__ import annotations

import numpy as np

from retrain.evaluation import calibration, confidence_metrics
from retrain.report import figures
from retrain.report.report_parts import ReportParts

RELIABILITY_FILE = "reliability.png"
# How many of the most unknown-looking test images the page shows.
SHOWN_UNKNOWN = 12
UNKNOWN_TABLE = "unknown pictures (table and most unknown-looking test images)"


def uncalibrated(record) -> np.ndarray:
    """float32 [n, k]: the test images' probabilities before temperature scaling.

    The record's `uncalibrated` ones when it has them. Otherwise recovered:
    the record keeps the calibrated softmax(z / T), and calibrating them
    again with temperature 1 / T gives softmax(z) back, up to float32
    rounding while T is near 1 (a small T saturates them at 0 and 1, which
    no temperature undoes).
    """
    if "testing" in record.uncalibrated:
        return record.uncalibrated["testing"]
    temperature = float(record.calibration["temperature"])
    return calibration.calibrate(record.probabilities["testing"], 1.0 / temperature)


def calibration_view(record, out, parts: ReportParts) -> dict | None:
    """The calibration section's values, with RELIABILITY_FILE drawn into `out`.

    None when the record has no calibration or no test images. The dict:
    `confidence_metrics.calibration_summary` of the record's test images
    (temperature, bins, images, ece_before, ece_after) and figure (the file
    name, or None when it could not be drawn); None too when the figures
    could not be computed. Either failure is a warning in `parts`.
    """
    if record.calibration is None or not len(record.rows("testing")):
        return None
    if "testing" not in record.probabilities:
        return None
    view = None
    with parts.part(RELIABILITY_FILE):
        bins = int(record.calibration.get("bins", calibration.BINS))
        labels = record.labels[record.rows("testing")]
        before, after = uncalibrated(record), record.probabilities["testing"]
        # From the record's probabilities (not figures written beside them): the
        # text and the diagram's titles always agree.
        view = {
            **confidence_metrics.calibration_summary(
                before, after, labels, float(record.calibration["temperature"]), bins
            ),
            "figure": None,
        }
        figures.plot_reliability(before, after, labels, out / RELIABILITY_FILE, bins=bins)
        view["figure"] = RELIABILITY_FILE
    return view


def most_unknown(record, count: int = SHOWN_UNKNOWN) -> list[dict]:
    """The `count` test images with the highest unknown scores, highest first.

    Each: image (relative path), true and predicted class, confidence (the
    predicted class's probability), score, unknown (past the threshold).
    Empty without a detector, test scores or test probabilities.
    """
    scores = record.unknown_scores.get("testing")
    probabilities = record.probabilities.get("testing")
    if record.unknown is None or scores is None or probabilities is None:
        return []
    threshold = float(record.unknown["threshold"])
    entries = record.entries("testing")
    # Stable: equal scores keep record order, so a rebuilt page lists the same images.
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:count]
    shown = []
    for row in order:
        guess = int(probabilities[row].argmax())
        shown.append(
            {
                "image": entries[row].relative_path,
                "true": record.class_names[entries[row].label_index],
                "predicted": record.class_names[guess],
                "confidence": float(probabilities[row, guess]),
                "score": float(scores[row]),
                "unknown": bool(scores[row] > threshold),
            }
        )
    return shown


def unknown_view(record, parts: ReportParts) -> dict | None:
    """The unknown section's values; None without a detector in the record (or on failure,
    then a warning in `parts`).

    `confidence_metrics.unknown_summary` of the record, its per-class rows
    extended with the class's validation and test image counts, plus
    "images": `most_unknown(record)`.
    """
    if record.unknown is None:
        return None
    view = None
    with parts.part(UNKNOWN_TABLE):
        labels = {
            split: record.labels[record.rows(split)]
            for split in ("validation", "testing")
            if split in record.unknown_scores
        }
        summary = confidence_metrics.unknown_summary(
            record.unknown,
            record.unknown_scores,
            labels,
            record.probabilities.get("testing"),
            record.class_names,
        )
        counts = record.counts()
        for index, row in enumerate(summary["per_class"]):
            row["validation_images"] = int(counts[index, 1])
            row["test_images"] = int(counts[index, 2])
        summary.setdefault("method", confidence_metrics.METHOD)
        view = {**summary, "images": most_unknown(record)}
    return view
