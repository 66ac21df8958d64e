"""The run's confidence stage: calibrated probabilities and the unknown detector.

After training, on every path: a temperature fitted on the validation
probabilities (`calibration`), applied to each split's; then the unknown
detector (`unknown`) fitted on a sample of training vectors, its threshold
accepting `Config.unknown_acceptance` of the validation images, and the
unknown scores of the validation and test images. The exports, the metrics,
the run record and the page all take this one `Confidence`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from retrain.evaluation import calibration, confidence_metrics, unknown

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Confidence:
    """What the confidence stage fitted and computed.

    temperature: divides the logits (1.0 when there was nothing to fit on).
    probabilities / uncalibrated: split -> float32 [n, k], with and without it.
    detector: unknown.UnknownDetector, or None when it could not be fitted.
    unknown_scores: split -> float32 [n] scores of that split's images.
    """

    temperature: float
    probabilities: dict[str, np.ndarray]
    uncalibrated: dict[str, np.ndarray]
    detector: unknown.UnknownDetector | None = None
    unknown_scores: dict[str, np.ndarray] = field(default_factory=dict)

    def detector_record(self) -> dict | None:
        """The detector's settings for metrics.json and the run record; None without one."""
        if self.detector is None:
            return None
        return confidence_metrics.detector_summary(self.detector)


def calibrated(views: dict[str, np.ndarray], validation_labels: np.ndarray) -> Confidence:
    """The temperature fitted on views["validation"] ([v, n, k]) and every split calibrated.

    Without validation images the temperature stays 1.0 (a warning says so).
    """
    if not len(validation_labels):
        logger.warning(
            "No validation images: the probabilities are not calibrated (temperature 1.0); "
            "keep --validation_percentage above 0 for calibrated probabilities."
        )
    temperature = calibration.fit_temperature(views["validation"], validation_labels)
    return Confidence(
        temperature,
        {name: calibration.calibrate(split, temperature) for name, split in views.items()},
        {name: calibration.calibrate(split) for name, split in views.items()},
    )


def with_detector(confidence: Confidence, vectors_of, buckets, acceptance: float) -> Confidence:
    """`confidence` with the unknown detector and the validation and test images' scores.

    vectors_of(entries) -> float32 [len(entries), d]: the exported model's
    bottleneck vectors of those images (`retrain.training.vectors`).
    buckets: the run's data.buckets.Buckets.
    """
    reference = vectors_of(unknown.reference_entries(buckets.training.entries))
    validation = vectors_of(buckets.validation.entries)
    detector = unknown.fit(reference, validation, acceptance)
    scores = {"validation": detector.scores(validation)} if len(validation) else {}
    del validation  # the test vectors may be as many: one split in memory at a time
    scores["testing"] = detector.scores(vectors_of(buckets.testing.entries))
    if "validation" not in scores:
        scores["validation"] = np.zeros(0, np.float32)
    return Confidence(
        confidence.temperature,
        confidence.probabilities,
        confidence.uncalibrated,
        detector,
        scores,
    )
