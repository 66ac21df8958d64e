"""Fine-tuning: the head trained on the cache, then head + the backbone's top layers on images.

`unfreeze` makes the top N layers of `backbone.layers` trainable (counted from
the output, as Keras lists them), keeping every BatchNormalization layer
frozen: a frozen Keras BatchNormalization runs in inference mode, so its
moving mean and variance never change (a small batch of new images would
otherwise overwrite the ImageNet statistics the weights depend on; Keras
issues #9214 and #9965). `fine_tune` then trains head and unfrozen layers
together on decoded images with Adam at a low learning rate that decays along
a cosine to zero, and checkpoints after every epoch: rerun with the same
settings and images, a killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from retrain.training import train
from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)


@dataclass
class FineTuneResult:
    """How fine-tuning went.

    history: one dict per epoch run in this process (see train.TrainResult).
    resumed_epoch: the epochs a checkpoint supplied (0 for a fresh start).
    trainable_layers: names of the backbone layers whose weights were trained.
    """

    history: list[dict] = field(default_factory=list)
    resumed_epoch: int = 0
    trainable_layers: list[str] = field(default_factory=list)


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
            f"Received: fine_tune_layers={layers}")
    chosen = set(map(id, backbone.layers if layers == -1 else backbone.layers[depth - layers:]))
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = (id(layer) in chosen
                           and not isinstance(layer, keras.layers.BatchNormalization))
    trained = [layer.name for layer in backbone.layers if layer.trainable and layer.trainable_weights]
    if not trained:
        top = [layer.name for layer in backbone.layers[depth - layers:]]
        raise RetrainError(
            f"--fine_tune_layers {layers} unfreezes only layers of {backbone.name} with nothing to "
            f"train ({', '.join(top)}; BatchNorm layers stay frozen): choose more layers, or -1. "
            f"Received: fine_tune_layers={layers}")
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
    *,
    input_size: int,
    layers: int,
    steps_per_epoch: int,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    checkpoint_dir,
    fingerprint: str,
    summaries_dir: str | None = None,
    progress: bool = True,
    class_weights=None,
) -> FineTuneResult:
    """Trains head and the top `layers` of the backbone together; weights change in place.

    Args:
      backbone: keras.Model float32 [b, input_size, input_size, 3] RGB in
        [0, 255] -> float32 [b, feature_dim]; its layers' trainable flags are
        set here and restored (all True) on return.
      head: the trained head, float32 [b, feature_dim] -> [b, num_classes].
      training: endless tf.data.Dataset of (float32 [b, input_size,
        input_size, 3] RGB in [0, 255], int64 [b] labels).
      validation: finite dataset of the same, or None.
      layers: top layers of `backbone.layers` to train; -1 = all.
      steps_per_epoch, epochs: steps per pass over the training images, passes.
      learning_rate: Adam's initial rate; it decays along a cosine to 0.
      batch_size: images per step (progress bar).
      checkpoint_dir: folder of the checkpoint (created; removed after success).
      fingerprint: `checkpoints.run_fingerprint` of this run's settings and
        images; a checkpoint with another one is discarded and training
        starts over.
      summaries_dir: TensorBoard folder; scalars go to fine_tune_train and
        fine_tune_validation in it.
      class_weights: float [num_classes] training-loss weight of each class
        (`train.balanced_class_weights`), or None, as the head was trained.

    Returns:
      FineTuneResult.
    """
    trainable_layers = unfreeze(backbone, layers)
    try:
        images = keras.Input((input_size, input_size, 3), name="pixels")
        model = keras.Model(images, head(backbone(images)), name="fine_tuned")
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps_per_epoch * epochs)
        model.compile(optimizer=keras.optimizers.Adam(schedule),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        history, resumed = train.fit(
            model, training, validation, steps_per_epoch=steps_per_epoch, epochs=epochs,
            batch_size=batch_size, summaries_dir=summaries_dir, progress=progress,
            description="Fine-tuning", checkpoint=(checkpoint_dir, fingerprint),
            run_names=("fine_tune_train", "fine_tune_validation"),
            class_weight=(None if class_weights is None else
                          train.class_weight_dict(class_weights, head.output_shape[-1])))
    finally:
        freeze(backbone)
    return FineTuneResult(history, resumed, trainable_layers)


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Steps of one pass over `images` training images."""
    return max(1, math.ceil(images / batch_size))
