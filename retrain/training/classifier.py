"""The three training paths of a run, chosen from the settings.

    cached head   (default)          cached bottlenecks -> head
    distortions   (--flip_left_right, --random_crop, --random_scale,
                   --random_brightness)
                                      decoded, distorted images -> frozen
                                      backbone -> head, one step per batch
    fine-tuning   (--fine_tune_layers N)
                                      the cached head first, then head + the
                                      backbone's top N layers on decoded
                                      (distorted, when asked) images

Validation (and test) vectors of the first two come from the cache; the
cache is never written here, so distorted vectors never enter it. Data come
from `retrain.training.datasets`, fitting from `retrain.training.head` /
`retrain.training.fine_tune`, prediction from `retrain.training.predict`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from retrain.evaluation import distinct_validation
from retrain.evaluation.distinct_validation import DistinctValidation
from retrain.quiet_tensorflow import import_tensorflow
from retrain.training import checkpoints, datasets, fine_tune
from retrain.training.backbone import plain_backbone
from retrain.training.callbacks import PixelValidationScores
from retrain.training.checkpoints import Checkpoint
from retrain.training.head import TrainResult, fit_head
from retrain.training.settings import (
    DistortionSettings,
    FineTuneSettings,
    HeadSettings,
    RunOptions,
)

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainedClassifier:
    """What training produced.

    head: keras.Model float32 [b, feature_dim] -> float32 [b, num_classes].
    backbone: the backbone the head belongs with (tuned weights after
        fine-tuning), or None when the plain backbone from `backbones.load`
        is the right one.
    path: "cached", "distortions" or "fine-tuning".
    head_result: the head's TrainResult; fine_tune_result: FineTuneResult or None.
    class_weights: float64 [num_classes] loss weights training used, or None.
    distinct: DistinctValidation of every validation image (bucket order), or
        None without validation images: for the run record and the page.
    """

    head: keras.Model
    backbone: keras.Model | None
    path: str
    head_result: TrainResult
    fine_tune_result: fine_tune.FineTuneResult | None = None
    class_weights: np.ndarray | None = None
    distinct: DistinctValidation | None = None


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """What one run adds to its Config: where it writes, what it already holds.

    options: the RunOptions of the head's training and of fine-tuning
      (TensorBoard folder, progress bars, class weights).
    checkpoint_root: Path, folder for the checkpoints of the distortion and
      fine-tuning paths (sub-folders distortions/ and fine_tune/); it must
      outlive a killed run.
    backbone: an already loaded backbone (fine-tuning loads it early), or None.
    after_checkpoint: Keras callbacks run after each checkpoint of the
      checkpointed fits (see `fit.fit`).
    """

    options: RunOptions
    checkpoint_root: Path
    backbone: keras.Model | None = None
    after_checkpoint: tuple = ()


@dataclasses.dataclass(frozen=True)
class _HeadFit:
    """What the head's fit shares across the three paths, built once per run.

    validation: the cached validation sample (`datasets.cached_sample`),
      with its DistinctValidation as a third item when it is not empty
      (`head.fit_head`).
    distinct: DistinctValidation of every validation entry, in bucket order
      (the pixel validation of fine-tuning scores them all), or None.
    settings: the HeadSettings.
    shape: {"feature_dim", "num_classes", "train_count"}: ints fit_head takes.
    distort: the distortion function of the images (uint8 -> float32
      [size, size, 3]), or None when none is asked for.
    fingerprint: what the checkpoints are valid for (`_fingerprint`).
    """

    validation: tuple
    settings: HeadSettings
    shape: dict
    distort: object
    fingerprint: str
    distinct: DistinctValidation | None = None


def train_classifier(config, spec, cache, buckets, run: TrainingRun) -> TrainedClassifier:
    """Trains the head (and fine-tunes, when asked) as `config` says.

    Args:
      config: the run's Config (settings objects are built from it here).
      spec: the BackboneSpec.
      cache: the BottleneckCache holding every usable entry.
      buckets: the usable images by split (`retrain.data.buckets.Buckets`).
      run: the TrainingRun (options, checkpoint folder, loaded backbone, callbacks).
    """
    keras.utils.set_random_seed(config.seed)  # before any dataset, whose shuffles draw from it
    validation = datasets.cached_sample(
        cache, buckets.validation.entries, config.validation_batch_size, config.seed
    )
    sample_distinct, distinct = _distinct(cache, buckets, validation[0])
    # Built field by field in this order, as the datasets draw from the seed in turn.
    head_fit = _HeadFit(
        validation=validation if sample_distinct is None else (*validation, sample_distinct),
        distinct=distinct,
        distort=DistortionSettings.from_config(config).function(spec.input_size),
        fingerprint=_fingerprint(config, cache, Path(buckets.image_dir), buckets),
        settings=HeadSettings.from_config(config, run.options),
        shape={
            "feature_dim": spec.feature_dim,
            "num_classes": len(buckets.class_names),
            "train_count": len(buckets.training.entries),
        },
    )
    if head_fit.distort is not None and not config.fine_tune_layers:
        trained = _train_on_distortions(config, spec, buckets, run, head_fit)
    else:
        training = datasets.cached_training(
            cache, buckets.training.entries, config.train_batch_size, config.seed
        )
        head_result = fit_head(training, head_fit.validation, head_fit.settings, **head_fit.shape)
        trained = (
            _fine_tune(config, spec, buckets, run, head_fit, head_result)
            if config.fine_tune_layers
            else TrainedClassifier(
                head_result.head,
                run.backbone,
                "cached",
                head_result,
                class_weights=run.options.class_weights,
            )
        )
    _log_kept(trained)
    return dataclasses.replace(trained, distinct=distinct)


def _distinct(cache, buckets, validation_vectors):
    """(DistinctValidation of the head's validation sample, of every validation entry).

    The two are one object when the sample is the whole bucket (the default);
    (None, None) without validation images. Logs the summary line.
    """
    if not len(validation_vectors):
        return None, None
    training, entries = buckets.training.entries, buckets.validation.entries
    sample = distinct_validation.from_cache(cache, training, validation_vectors)
    # cached_sample keeps the entries' order when it takes them all.
    every = (
        sample
        if len(validation_vectors) == len(entries)
        else distinct_validation.for_entries(cache, training, entries)
    )
    logger.info("%s", every.summary())
    return sample, every


def _train_on_distortions(config, spec, buckets, run, head_fit: _HeadFit) -> TrainedClassifier:
    """The distortions path: the head fit on distorted images through the frozen backbone."""
    backbone = run.backbone or plain_backbone(spec, config.backbone_weights)
    pixels = datasets.decoded_training(
        Path(buckets.image_dir),
        buckets.training.entries,
        spec.input_size,
        config.train_batch_size,
        config.seed,
        head_fit.distort,
    )
    head_result = fit_head(
        datasets.through_backbone(pixels, backbone),
        head_fit.validation,
        head_fit.settings,
        description="Training on distorted images",
        checkpoint=Checkpoint(Path(run.checkpoint_root) / "distortions", head_fit.fingerprint),
        after_checkpoint=run.after_checkpoint,
        **head_fit.shape,
    )
    return TrainedClassifier(
        head_result.head,
        backbone,
        "distortions",
        head_result,
        class_weights=run.options.class_weights,
    )


def _fine_tune(config, spec, buckets, run, head_fit: _HeadFit, head_result) -> TrainedClassifier:
    """The fine-tuning path's second part: head + backbone on decoded images, after the cached head."""
    backbone = run.backbone or plain_backbone(spec, config.backbone_weights)
    settings = FineTuneSettings.from_config(config, run.options)
    image_dir, train_entries = Path(buckets.image_dir), buckets.training.entries
    result = fine_tune.fine_tune(
        backbone,
        head_result.head,
        datasets.decoded_training(
            image_dir,
            train_entries,
            spec.input_size,
            settings.batch_size,
            config.seed,
            head_fit.distort,
        ),
        PixelValidationScores(
            datasets.decoded_evaluation(
                image_dir, buckets.validation.entries, spec.input_size, settings.batch_size
            ),
            head_fit.distinct,
        )
        if len(buckets.validation)
        else None,
        settings,
        input_size=spec.input_size,
        steps_per_epoch=fine_tune.steps_per_epoch(len(train_entries), settings.batch_size),
        checkpoint=Checkpoint(Path(run.checkpoint_root) / "fine_tune", head_fit.fingerprint),
        after_checkpoint=run.after_checkpoint,
    )
    _warn_if_worse(head_result, result)
    return TrainedClassifier(
        head_result.head, backbone, "fine-tuning", head_result, result, run.options.class_weights
    )


def _warn_if_worse(head_result, fine_tune_result) -> None:
    """Warns when fine-tuning ended below the cached head on the validation images.

    Compares the head at its kept step with fine-tuning at its kept epoch, on
    the distinct validation images (no near-copy in training) when both chose
    their weights on them, else on all validation images; the warning names
    which. The tuned weights are kept (they are what was asked for), but on
    photos that ImageNet features already fit, fine-tuning can cost accuracy.
    """
    before, after = _kept_entry(head_result), _kept_entry(fine_tune_result)
    if before is None or after is None:
        return
    distinct = before.get("selection") == after.get("selection") == "distinct"
    key, images = (
        ("distinct_val_accuracy", "validation images with no near-copy in training")
        if distinct
        else ("val_accuracy", "validation images")
    )
    if before.get(key) is not None and after.get(key) is not None and after[key] < before[key]:
        logger.warning(
            "Fine-tuning ended at accuracy %.3f on the %s, below the cached head's %.3f: "
            "these photos may suit the cached head better; or try a lower "
            "--fine_tune_learning_rate or fewer --fine_tune_layers.",
            after[key],
            images,
            before[key],
        )


def _kept_entry(result) -> dict | None:
    """The history entry of the weights a TrainResult or FineTuneResult holds, or None.

    A TrainResult holds its best_step; a FineTuneResult its best_epoch
    (counted from 1 over all epochs, resumed ones included; 0 or absent: the last).
    """
    history = result.history
    if not history:
        return None
    if hasattr(result, "best_step"):
        return next((entry for entry in history if entry["step"] == result.best_step), None)
    index = getattr(result, "best_epoch", 0) - 1 - result.resumed_epoch
    return history[index] if 0 <= index < len(history) else history[-1]


def _log_kept(trained: TrainedClassifier) -> None:
    """The end-of-training line: validation accuracy of the kept weights, all and distinct."""
    entry = _kept_entry(trained.fine_tune_result or trained.head_result)
    if entry is None or entry.get("val_accuracy") is None:
        return
    line = f"Validation accuracy of the kept weights: {entry['val_accuracy']:.3f} on all images"
    distinct = entry.get("distinct_val_accuracy")
    if distinct is not None:
        line += f", {distinct:.3f} on those with no near-copy in training."
        note = distinct_validation.optimism(entry["val_accuracy"], distinct)
        line += f" {note}" if note else ""
    logger.info("%s", line)


def _fingerprint(config, cache, image_dir, buckets):
    """What a checkpoint is valid for: every setting but the output places, and the images."""
    ignored = {
        "output_dir",
        "output_graph",
        "output_labels",
        "summaries_dir",
        "bottleneck_dir",
        "print_misclassified_test_images",
        "image_dir",
        "cache_only",
        "extraction_batch_size",
        "test_batch_size",
    }
    settings = {
        key: value for key, value in dataclasses.asdict(config).items() if key not in ignored
    }
    settings["backbone_fingerprint"] = cache.identity.fingerprint
    records = []
    for bucket in ("training", "validation"):
        for entry in buckets[bucket].entries:
            status = os.stat(image_dir / entry.relative_path)
            records.append(
                [entry.relative_path, entry.label_index, bucket, status.st_size, status.st_mtime_ns]
            )
    return checkpoints.run_fingerprint(settings, records)
