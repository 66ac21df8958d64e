"""The run's assessment stage: what the trained classifier says about the held-out images.

    predictions (views) -> calibration and the unknown detector -> test
    metrics (metrics.json, stdout) -> the run record (what the page reads)

`assess` runs them in order after training; the exports take its
`Confidence` (temperature and detector) from the result.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from retrain import console
from retrain.config import Config
from retrain.data.buckets import Buckets
from retrain.errors import RetrainError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assessment:
    """evaluation: metrics.Evaluation of the test images, or None without any;
    confidence: evaluation.confidence.Confidence; record: the saved run_record.RunRecord."""

    evaluation: object
    confidence: object
    record: object


def assess(config: Config, spec, trained, cache, buckets: Buckets, skipped, out_dir: Path):
    """Predicts, calibrates, fits the unknown detector, evaluates and saves the record in out_dir."""
    views = predict_splits(config, spec, trained, cache, buckets)
    confidence = fit_confidence(config, spec, trained, cache, buckets, views)
    summaries = confidence_summaries(confidence, buckets)
    test_evaluation = evaluate(config, confidence, summaries, buckets, out_dir)
    record = save_record(config, buckets, trained, confidence, summaries, skipped, out_dir)
    return Assessment(test_evaluation, confidence, record)


def predict_splits(config: Config, spec, trained, cache, buckets: Buckets) -> dict:
    """{"validation" | "testing": float32 [views, n, num_classes] probabilities}."""
    from retrain.evaluation import run_record
    from retrain.training import predict
    from retrain.training.backbone import plain_backbone

    backbone = None
    if config.test_time_flip and trained.backbone is None:
        # The mirrored pictures have no cached vectors: they go through the backbone.
        backbone = plain_backbone(spec, config.backbone_weights)
    return predict.split_probabilities(
        trained,
        cache,
        buckets,
        run_record.EVALUATED_SPLITS,
        input_size=spec.input_size,
        test_batch_size=config.test_batch_size,
        extraction_batch_size=config.extraction_batch_size,
        test_time_flip=config.test_time_flip,
        backbone=backbone,
    )


def fit_confidence(config: Config, spec, trained, cache, buckets: Buckets, views: dict):
    """The calibrated probabilities and the unknown detector: an evaluation.confidence.Confidence.

    A detector that cannot be fitted is a warning: the model still labels, without "unknown".
    """
    from retrain.evaluation import confidence
    from retrain.training.vectors import bottleneck_vectors

    calibrated = confidence.calibrated(views, buckets.validation.labels)
    batch = config.extraction_batch_size if config.test_batch_size == -1 else config.test_batch_size

    def vectors_of(entries):
        return bottleneck_vectors(
            trained, cache, buckets.image_dir, entries, spec.input_size, batch
        )

    try:
        return confidence.with_detector(calibrated, vectors_of, buckets, config.unknown_acceptance)
    except (RetrainError, ValueError, OSError) as error:
        logger.warning("No unknown detector: %s. The model labels without 'unknown'.", error)
        return calibrated


def evaluate(config: Config, confidence, summaries: dict, buckets: Buckets, out_dir: Path):
    """The test bucket's metrics, written to out_dir and summed up on stdout; None without tests.

    confidence: the evaluation.confidence.Confidence of the run (its calibrated
    probabilities); summaries: `confidence_summaries`, for metrics.json.
    """
    from retrain import evaluation
    from retrain.evaluation import confidence_metrics

    testing = buckets.testing
    if not len(testing):
        logger.warning(
            "The test bucket is empty (testing_percentage=%s): no test accuracy.",
            config.testing_percentage,
        )
        return None
    probabilities = confidence.probabilities["testing"]
    test_evaluation = evaluation.evaluate(probabilities, testing.labels, buckets.class_names)
    misclassified = evaluation.misclassified(probabilities, testing.entries, buckets.class_names)
    evaluation.write_metrics(test_evaluation, out_dir, misclassified, summaries)
    console.result(evaluation.summary(test_evaluation))
    for line in confidence_metrics.summary_lines(
        summaries.get("calibration"), summaries.get("unknown")
    ):
        console.result(line)
    if config.print_misclassified_test_images:
        evaluation.print_misclassified(misclassified)
    return test_evaluation


def confidence_summaries(confidence, buckets: Buckets) -> dict:
    """{"calibration": ..., "unknown": ...} of evaluation.confidence_metrics, for metrics.json."""
    from retrain.evaluation import confidence_metrics

    testing = buckets.testing
    summaries = {
        "calibration": confidence_metrics.calibration_summary(
            confidence.uncalibrated["testing"],
            confidence.probabilities["testing"],
            testing.labels,
            confidence.temperature,
        )
    }
    if confidence.detector is not None:
        summaries["unknown"] = confidence_metrics.unknown_summary(
            confidence.detector_record(),
            confidence.unknown_scores,
            {"validation": buckets.validation.labels, "testing": testing.labels},
            confidence.probabilities["testing"],
            buckets.class_names,
        )
    return summaries


def save_record(
    config: Config, buckets: Buckets, trained, confidence, summaries, skipped, out_dir: Path
):
    """The run record (what the report page and a rebuilt report read), saved in out_dir."""
    from retrain.evaluation import run_record

    head_result = trained.head_result
    record = run_record.RunRecord(
        image_dir=str(buckets.image_dir),
        class_names=buckets.class_names,
        settings=dataclasses.asdict(config),
        images=buckets.paths,
        labels=buckets.labels,
        splits=buckets.splits,
        history=head_result.history,
        best_step=head_result.best_step,
        stopped_early=head_result.stopped_early,
        class_weights=None if trained.class_weights is None else trained.class_weights.tolist(),
        probabilities=confidence.probabilities,
        skipped=[(str(path), str(reason)) for path, reason in skipped],
        distinct_validation=None if trained.distinct is None else trained.distinct.record(),
        calibration=summaries["calibration"],
        unknown=confidence.detector_record(),
        unknown_scores=confidence.unknown_scores,
        # Exact "before" for the page's reliability diagram (a small T saturates the calibrated).
        uncalibrated={"testing": confidence.uncalibrated["testing"]},
    )
    run_record.save(record, out_dir)
    return record
