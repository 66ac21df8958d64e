"""Fine-tuning: the head trained on the cache, then head + the backbone's top layers on images.

`unfreeze` makes the top N layers of `backbone.layers` trainable (counted from
the output, as Keras lists them), keeping every BatchNormalization layer
frozen: a frozen Keras BatchNormalization runs in inference mode, so its
moving mean and variance never change (a small batch of new images would
otherwise overwrite the ImageNet statistics the weights depend on; Keras
issues #9214 and #9965). `fine_tune` then trains head and unfrozen layers
together on decoded images: AdamW with decoupled weight decay, a rate that
warms up linearly then decays along a cosine to zero and shrinks per block
toward the input (`retrain.training.learning_rates`), label smoothing
(`retrain.training.losses`); it keeps the weights of the epoch with the
lowest validation loss, and checkpoints after every epoch: rerun with the
same settings and images, a killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow
from retrain.training import learning_rates, throughput
from retrain.training.checkpoints import Checkpoint
from retrain.training.class_weights import class_weight_dict
from retrain.training.fit import FitLoop, fit
from retrain.training.losses import fine_tune_loss
from retrain.training.settings import FineTuneSettings

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)

logger = logging.getLogger(__name__)


@dataclass
class FineTuneResult:
    """How fine-tuning went.

    history: one dict per epoch run in this process (see head.TrainResult).
    resumed_epoch: the epochs a checkpoint supplied (0 for a fresh start).
    trainable_layers: names of the backbone layers whose weights were trained.
    best_epoch: the epoch (from 1) whose weights the model holds: the lowest
      validation loss of the epochs run in this process, else the last.
    images_per_second: training images per second of the steps (decoding
      overlapped), or None; forward_images_per_second: the validation
      pass's images per second (forward only), or None.
    """

    history: list[dict] = field(default_factory=list)
    resumed_epoch: int = 0
    trainable_layers: list[str] = field(default_factory=list)
    best_epoch: int = 0
    images_per_second: float | None = None
    forward_images_per_second: float | None = None


def unfreeze(backbone: keras.Model, layers: int) -> list[str]:
    """Makes the top `layers` layers of `backbone` trainable (-1: all), BatchNorm excepted.

    Returns:
      The names of the layers that now have trainable weights.

    Raises:
      RetrainError if `layers` exceeds the backbone's depth, or the chosen
      layers hold nothing to train (pooling, activations and BatchNorm only).
    """
    depth = len(backbone.layers)
    if layers > depth or layers < -1 or layers == 0:
        raise RetrainError(
            f"--fine_tune_layers must be -1 (all) or 1 to {depth}, the depth of {backbone.name}. "
            f"Received: fine_tune_layers={layers}"
        )
    chosen = set(map(id, backbone.layers if layers == -1 else backbone.layers[depth - layers :]))
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = id(layer) in chosen and not isinstance(
            layer, keras.layers.BatchNormalization
        )
    trained = [
        layer.name for layer in backbone.layers if layer.trainable and layer.trainable_weights
    ]
    if not trained:
        top = [layer.name for layer in backbone.layers[depth - layers :]]
        raise RetrainError(
            f"--fine_tune_layers {layers} unfreezes only layers of {backbone.name} with nothing to "
            f"train ({', '.join(top)}; BatchNorm layers stay frozen): choose more layers, or -1. "
            f"Received: fine_tune_layers={layers}"
        )
    return trained


def freeze(backbone: keras.Model) -> None:
    """Makes every layer trainable again, as `backbones.load` returns it (for export)."""
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = True


def fine_tune(
    backbone: keras.Model,
    head: keras.Model,
    training,
    validation,
    settings: FineTuneSettings,
    *,
    input_size: int,
    steps_per_epoch: int,
    checkpoint: Checkpoint,
    after_checkpoint=(),
) -> FineTuneResult:
    """Trains head and the top `settings.layers` of the backbone together; weights change in place.

    Args:
      backbone: keras.Model float32 [b, input_size, input_size, 3] RGB in
        [0, 255] -> float32 [b, feature_dim]; its layers' trainable flags are
        set here and restored (all True) on return.
      head: the trained head, float32 [b, feature_dim] -> [b, num_classes].
      training: endless tf.data.Dataset of (float32 [b, input_size,
        input_size, 3] RGB in [0, 255], int64 [b] labels).
      validation: a `callbacks.PixelValidationScores` of the validation
        images, or None. With it, the weights of the epoch with the lowest
        `selection_loss` (validation loss on the images with no near-copy in
        training, when there are enough of them) are the ones kept.
      settings: FineTuneSettings (layers, epochs, the rate and its schedule,
        weight decay, label smoothing, batch size, TensorBoard folder,
        progress bar, class weights).
      steps_per_epoch: steps per pass over the training images.
      checkpoint: where the checkpoint goes (created; removed after success)
        and the `checkpoints.run_fingerprint` of this run's settings and
        images; a checkpoint with another one is discarded and training
        starts over.
      after_checkpoint: Keras callbacks run after each epoch's checkpoint (see `fit.fit`).

    Returns:
      FineTuneResult.
    """
    trainable_layers = unfreeze(backbone, settings.layers)
    try:
        images = keras.Input((input_size, input_size, 3), name="pixels")
        model = keras.Model(images, head(backbone(images)), name="fine_tuned")
        model.compile(
            optimizer=_optimizer(backbone, settings, steps_per_epoch),
            loss=fine_tune_loss(settings.label_smoothing),
            metrics=["accuracy"],
        )
        loop = FitLoop(
            steps_per_epoch=steps_per_epoch,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            description="Fine-tuning",
            summaries_dir=settings.summaries_dir,
            run_names=("fine_tune_train", "fine_tune_validation"),
            progress=settings.progress,
            checkpoint=checkpoint,
        )
        keep_best = _keep_best(validation, settings.epochs)
        step_rate = throughput.StepRate(settings.batch_size)
        history, resumed = fit(
            model,
            training,
            validation,
            loop,
            callbacks=[step_rate, *keep_best],
            class_weight=None
            if settings.class_weights is None
            else class_weight_dict(settings.class_weights, head.output_shape[-1]),
            after_checkpoint=after_checkpoint,
        )
    finally:
        freeze(backbone)
    best = keep_best[0].best_epoch + 1 if keep_best and history else settings.epochs
    rates = (
        step_rate.images_per_second(),
        validation.images_per_second() if validation is not None else None,
    )
    line = throughput.rate_line(*rates)
    if line:
        logger.info("%s", line)
    return FineTuneResult(history, resumed, trainable_layers, best, *rates)


def _optimizer(backbone, settings: FineTuneSettings, steps_per_epoch: int):
    """AdamW with layer-wise rates on a warm-up + cosine schedule (`learning_rates`)."""
    total = steps_per_epoch * settings.epochs
    schedule = learning_rates.warmup_cosine(
        settings.learning_rate, total, round(settings.warmup_epochs * steps_per_epoch)
    )
    return learning_rates.LayerwiseAdamW(
        schedule,
        learning_rates.rate_scales(backbone, settings.layer_decay),
        weight_decay=settings.weight_decay,
    )


def _keep_best(validation, epochs: int) -> list:
    """[EarlyStopping that never stops but restores the lowest-selection_loss epoch], or []."""
    if validation is None:
        return []
    return [
        keras.callbacks.EarlyStopping(
            monitor="selection_loss", mode="min", patience=epochs + 1, restore_best_weights=True
        )
    ]


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Steps of one pass over `images` training images."""
    return max(1, math.ceil(images / batch_size))
