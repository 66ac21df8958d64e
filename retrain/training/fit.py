"""The one fit loop every training path uses: a compiled model, an endless training dataset.

Each "epoch" ends with an evaluation, a history entry, TensorBoard scalars
and, when the loop is checkpointed, a checkpoint a killed run resumes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrain.quiet_tensorflow import import_tensorflow
from retrain.training import checkpoints
from retrain.training.callbacks import EvaluationLog, ValidationScores

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)


@dataclass(frozen=True)
class FitLoop:
    """How the loop runs and reports.

    steps_per_epoch, epochs: Keras's; an epoch ends with an evaluation.
    batch_size: images per step, for the progress bar's images/s and ETA.
    description: the progress bar's label (and the checkpoint's log lines).
    summaries_dir: TensorBoard folder or None; scalars go to its `run_names`
      sub-folders (training, validation), against the step number.
    run_names: those two sub-folders.
    progress: show the progress bar on stderr.
    checkpoint: None, or a `checkpoints.Checkpoint`: the model and optimizer
      are saved in its folder after every epoch (keras.callbacks.BackupAndRestore,
      two generations, so a kill mid-save leaves the previous one); a rerun
      whose fingerprint matches resumes from it and says so, any other starts
      over. The folder is removed when fit finishes.
    """

    steps_per_epoch: int
    epochs: int
    batch_size: int
    description: str = "Training"
    summaries_dir: str | None = None
    run_names: tuple[str, str] = ("train", "validation")
    progress: bool = True
    checkpoint: checkpoints.Checkpoint | None = None


def fit(
    model: keras.Model,
    training,
    validation,
    loop: FitLoop,
    *,
    callbacks=(),
    class_weight=None,
    after_checkpoint=(),
):
    """Fits `model` as `loop` says.

    Args:
      model: compiled keras.Model with an "accuracy" metric.
      training: endless tf.data.Dataset of (inputs, int64 labels) batches.
      validation: finite tf.data.Dataset of the same; or (inputs, labels[,
        DistinctValidation]) arrays, scored by `ValidationScores` (far
        cheaper for short epochs); or a validation callback such as
        `PixelValidationScores` (run first, so its keys reach every other
        callback); or None.
      loop: the FitLoop.
      callbacks: further Keras callbacks (early stopping, ...).
      class_weight: Keras's {class index: loss weight}, or None.
      after_checkpoint: Keras callbacks run at each epoch's end after its
        checkpoint is saved (a test parks a run there to kill it).

    Returns:
      (history, initial_epoch): one dict per epoch run here (see
      head.TrainResult.history), and the epochs a checkpoint supplied.
    """
    initial_epoch = 0
    callbacks = list(callbacks)
    if loop.checkpoint is not None:
        folder = loop.checkpoint.folder
        initial_epoch = checkpoints.resume_point(
            folder, loop.checkpoint.fingerprint, loop.epochs, loop.description
        )
        callbacks.append(keras.callbacks.BackupAndRestore(str(folder), double_checkpoint=True))
    log_callback = EvaluationLog(
        loop.steps_per_epoch,
        loop.epochs,
        loop.batch_size,
        loop.summaries_dir,
        loop.progress,
        description=loop.description,
        run_names=loop.run_names,
        initial_epoch=initial_epoch,
    )
    callbacks = [log_callback, *callbacks, *after_checkpoint]
    if isinstance(validation, tuple):
        validation = ValidationScores(*validation)
    if isinstance(validation, keras.callbacks.Callback):
        # First, so that the log, early stopping and the LR schedule see its scores.
        callbacks.insert(0, validation)
        validation = None
    try:
        model.fit(
            training,
            steps_per_epoch=loop.steps_per_epoch,
            epochs=loop.epochs,
            initial_epoch=initial_epoch,
            validation_data=validation,
            callbacks=callbacks,
            shuffle=False,
            verbose=0,
            class_weight=class_weight,
        )
    finally:
        log_callback.close()
    return log_callback.history, initial_epoch
