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
from `retrain.training.training_data`, fitting from `retrain.training.train` / `retrain.training.fine_tune`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from retrain import backbones
from retrain.training import checkpoints, fine_tune, train, training_data
from retrain.data import distortions
from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)

log = logging.getLogger(__name__)

@dataclasses.dataclass
class TrainedClassifier:
    """What training produced.

    head: keras.Model float32 [b, feature_dim] -> float32 [b, num_classes].
    backbone: the backbone the head belongs with (tuned weights after
        fine-tuning), or None when the plain backbone from `backbones.load`
        is the right one.
    path: "cached", "distortions" or "fine-tuning".
    head_result: the head's TrainResult; fine_tune_result: FineTuneResult or None.
    """

    head: keras.Model
    backbone: keras.Model | None
    path: str
    head_result: train.TrainResult
    fine_tune_result: fine_tune.FineTuneResult | None = None


def train_classifier(config, spec, cache, image_dir, by_bucket, num_classes, summaries_dir,
                     checkpoint_root, backbone=None, progress=True,
                     class_weights=None) -> TrainedClassifier:
    """Trains the head (and fine-tunes, when asked) as `config` says.

    Args:
      config: the run's Config.
      spec: the BackboneSpec.
      cache: the BottleneckCache holding every usable entry.
      image_dir: Path of the images.
      by_bucket: {"training" | "validation" | "testing": ImageEntry list}.
      num_classes: int.
      summaries_dir: TensorBoard folder.
      checkpoint_root: folder for the checkpoints of the distortion and
        fine-tuning paths (sub-folders distortions/ and fine_tune/); it must
        outlive a killed run.
      backbone: an already loaded backbone (fine-tuning loads it early), or None.
      progress: progress bars on stderr.
      class_weights: float [num_classes] loss weights of the head's training
        and of fine-tuning (`train.balanced_class_weights`), or None.
    """
    keras.utils.set_random_seed(config.seed)  # before any dataset, whose shuffles draw from it
    image_dir = Path(image_dir)
    train_entries = by_bucket["training"]
    validation = training_data.cached_sample(cache, by_bucket["validation"],
                                             config.validation_batch_size, config.seed)
    distort = distortions.distortion_function(spec.input_size, **config.distortions())
    fingerprint = _fingerprint(config, cache, image_dir, by_bucket)
    checkpoint_root = Path(checkpoint_root)
    head_settings = dict(
        feature_dim=spec.feature_dim, num_classes=num_classes, train_count=len(train_entries),
        how_many_training_steps=config.how_many_training_steps,
        learning_rate=config.learning_rate, train_batch_size=config.train_batch_size,
        eval_step_interval=config.eval_step_interval, seed=config.seed,
        summaries_dir=str(summaries_dir), progress=progress, class_weights=class_weights)
    if distort is not None and not config.fine_tune_layers:
        backbone = backbone or _load(spec, config)
        pixels = training_data.decoded_training(image_dir, train_entries, spec.input_size,
                                                config.train_batch_size, config.seed, distort)
        head_result = train.fit_head(training_data.through_backbone(pixels, backbone), validation,
                                     description="Training on distorted images",
                                     checkpoint=(checkpoint_root / "distortions", fingerprint),
                                     **head_settings)
        return TrainedClassifier(head_result.head, backbone, "distortions", head_result)

    training = training_data.cached_training(cache, train_entries, config.train_batch_size,
                                             config.seed)
    head_result = train.fit_head(training, validation, **head_settings)
    if not config.fine_tune_layers:
        return TrainedClassifier(head_result.head, backbone, "cached", head_result)

    backbone = backbone or _load(spec, config)
    batch = config.fine_tune_batch_size
    result = fine_tune.fine_tune(
        backbone, head_result.head,
        training_data.decoded_training(image_dir, train_entries, spec.input_size, batch,
                                       config.seed, distort),
        training_data.decoded_evaluation(image_dir, by_bucket["validation"], spec.input_size, batch)
        if by_bucket["validation"] else None,
        input_size=spec.input_size, layers=config.fine_tune_layers,
        steps_per_epoch=fine_tune.steps_per_epoch(len(train_entries), batch),
        epochs=config.fine_tune_epochs, learning_rate=config.fine_tune_learning_rate,
        batch_size=batch, checkpoint_dir=checkpoint_root / "fine_tune", fingerprint=fingerprint,
        summaries_dir=str(summaries_dir), progress=progress, class_weights=class_weights)
    _warn_if_worse(head_result, result)
    return TrainedClassifier(head_result.head, backbone, "fine-tuning", head_result, result)


def _warn_if_worse(head_result, fine_tune_result) -> None:
    """Warns when fine-tuning ended below the cached head on the validation images.

    The tuned weights are kept (they are what was asked for), but on photos
    that ImageNet features already fit, fine-tuning can cost accuracy.
    """
    before = next((entry["val_accuracy"] for entry in head_result.history
                   if entry["step"] == head_result.best_step), None)
    after = fine_tune_result.history[-1]["val_accuracy"] if fine_tune_result.history else None
    if before is not None and after is not None and after < before:
        log.warning("Fine-tuning ended at validation accuracy %.3f, below the cached head's %.3f: "
                    "these photos may suit the cached head better; or try a lower "
                    "--fine_tune_learning_rate or fewer --fine_tune_layers.", after, before)


def test_probabilities(config, spec, cache, image_dir, entries, trained: TrainedClassifier):
    """float32 [len(entries), num_classes] class probabilities of the test entries.

    From cached vectors, except after fine-tuning, whose backbone differs from
    the cache's: then from the decoded images through the tuned backbone.
    """
    head = trained.head
    probabilities = np.empty((len(entries), head.output_shape[-1]), np.float32)
    if trained.fine_tune_result is None:
        for positions, vectors in cache.stream(entries):
            probabilities[positions] = head.predict_on_batch(vectors)
        return probabilities
    batch = config.extraction_batch_size if config.test_batch_size == -1 else config.test_batch_size
    images = keras.Input((spec.input_size, spec.input_size, 3))
    model = keras.Model(images, head(trained.backbone(images)))
    start = 0
    for pixels, _ in training_data.decoded_evaluation(Path(image_dir), entries, spec.input_size,
                                                      batch):
        probabilities[start:start + len(pixels)] = model.predict_on_batch(pixels)
        start += len(pixels)
    return probabilities


def _load(spec, config):
    return backbones.load(spec.name, include_top=False, weights_file=config.backbone_weights)


def _fingerprint(config, cache, image_dir, by_bucket):
    """What a checkpoint is valid for: every setting but the output places, and the images."""
    ignored = {"output_dir", "output_graph", "output_labels", "summaries_dir", "bottleneck_dir",
               "print_misclassified_test_images", "image_dir", "cache_only",
               "extraction_batch_size", "test_batch_size"}
    settings = {key: value for key, value in dataclasses.asdict(config).items()
                if key not in ignored}
    settings["backbone_fingerprint"] = cache.identity.fingerprint
    records = []
    for bucket in ("training", "validation"):
        for entry in by_bucket[bucket]:
            status = os.stat(image_dir / entry.relative_path)
            records.append([entry.relative_path, entry.label_index, bucket,
                            status.st_size, status.st_mtime_ns])
    return checkpoints.run_fingerprint(settings, records)
