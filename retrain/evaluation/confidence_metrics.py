"""How far a run's probabilities can be trusted: calibration and unknown figures for reports.

`calibration_summary` gives the temperature and the expected calibration
error (ECE) of the test images before and after temperature scaling
(retrain.evaluation.calibration); `unknown_summary` gives, for the unknown
detector (retrain.evaluation.unknown), the share of validation and test
images past its threshold and, per class, the test precision among the
images not called unknown and how many of the class's images were called
unknown. Both are plain JSON-ready dicts: metrics.json, the run record and
the report page hold them; `summary_lines` is the run's console summary.
Pure numpy, no TensorFlow.
"""

from __future__ import annotations

import numpy as np

from retrain.evaluation import calibration, unknown

# The score's name (evaluation.unknown.METHOD, also the sidecar file's and TFLite's).
METHOD = unknown.METHOD


def calibration_summary(
    uncalibrated: np.ndarray,
    calibrated: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    bins: int = calibration.BINS,
) -> dict:
    """{"temperature", "bins", "images", "ece_before", "ece_after"} on one set of images.

    uncalibrated: float [n, k] probabilities at temperature 1 (or the views
    [v, n, k], combined as `calibration.calibrate(views, 1.0)`); calibrated:
    float [n, k]; labels: int [n]. The ECEs use `bins` equal-width bins.
    """
    uncalibrated = np.asarray(uncalibrated)
    if uncalibrated.ndim == 3:
        uncalibrated = calibration.calibrate(uncalibrated, 1.0)
    return {
        "temperature": float(temperature),
        "bins": int(bins),
        "images": len(labels),
        "ece_before": calibration.expected_calibration_error(uncalibrated, labels, bins),
        "ece_after": calibration.expected_calibration_error(calibrated, labels, bins),
    }


def detector_summary(detector) -> dict:
    """The detector dict of an `unknown.UnknownDetector` (anything with reference, k,
    threshold, acceptance): {"method", "k", "threshold", "acceptance", "reference_images"}."""
    return {
        "method": METHOD,
        "k": int(detector.k),
        "threshold": float(detector.threshold),
        "acceptance": float(detector.acceptance),
        "reference_images": len(detector.reference),
    }


def _share(called: np.ndarray | None) -> float | None:
    return float(called.mean()) if called is not None and len(called) else None


def unknown_summary(
    detector: dict,
    scores: dict,
    labels: dict,
    test_probabilities: np.ndarray | None,
    class_names: list[str],
) -> dict:
    """The detector dict plus the shares and per-class counts of images called unknown.

    detector: {"method", "k", "threshold", "acceptance", "reference_images"}
    (`detector_summary`). scores, labels: split ("validation", "testing") ->
    float [n] unknown scores and int [n] class indices of that split's images,
    in the same order; a split may be absent. test_probabilities: float [n, k]
    of the test images (None without test images).

    Returns the detector dict with "validation_unknown_share" and
    "test_unknown_share" (None without images) and "per_class": one dict per
    class, in class_names order: "class"; "test_precision", among the test
    images predicted this class and not called unknown the share truly of it
    (None when there are none); "validation_unknown" and "test_unknown", how
    many of this class's images were called unknown (score > threshold).
    """
    threshold = float(detector["threshold"])
    k = len(class_names)
    called = {
        split: np.asarray(scores[split], np.float64) > threshold
        for split in ("validation", "testing")
        if split in scores
    }
    counts = {
        split: np.bincount(np.asarray(labels[split], np.int64)[called[split]], minlength=k)
        if split in called
        else np.zeros(k, np.int64)
        for split in ("validation", "testing")
    }
    precision = [None] * k
    if test_probabilities is not None and "testing" in called:
        predicted = np.asarray(test_probabilities).argmax(axis=1)
        kept = ~called["testing"]
        truth = np.asarray(labels["testing"], np.int64)
        for index in range(k):
            mine = kept & (predicted == index)
            if mine.any():
                precision[index] = float((truth[mine] == index).mean())
    return {
        **detector,
        "validation_unknown_share": _share(called.get("validation")),
        "test_unknown_share": _share(called.get("testing")),
        "per_class": [
            {
                "class": name,
                "test_precision": precision[index],
                "validation_unknown": int(counts["validation"][index]),
                "test_unknown": int(counts["testing"][index]),
            }
            for index, name in enumerate(class_names)
        ],
    }


def summary_lines(calibration_figures: dict | None, unknown: dict | None) -> list[str]:
    """The run's lines about calibration and unknown pictures (none for a missing dict).

    calibration_figures: `calibration_summary`'s dict; unknown: `unknown_summary`'s.
    """
    lines = []
    if calibration_figures is not None:
        c = calibration_figures
        lines.append(
            f"Calibration: temperature {c['temperature']:.2f}, expected calibration error "
            f"{c['ece_before']:.3f} -> {c['ece_after']:.3f} ({c['bins']} bins, "
            f"{c.get('images', 0):,} test images)"
        )
    if unknown is not None:
        test_share = unknown.get("test_unknown_share")
        tested = (
            "" if test_share is None else f"; {100 * test_share:.1f}% of test images called unknown"
        )
        lines.append(
            f"Unknown: threshold {unknown['threshold']:.3f} accepts "
            f"{100 * unknown['acceptance']:.0f}% of validation images{tested}"
        )
    return lines
