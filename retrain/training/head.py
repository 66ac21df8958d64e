"""The new softmax layer: building it and fitting it on bottlenecks.

The head is one Dense layer with a softmax, trained with Adam on shuffled
mini-batches of bottlenecks (cached, or computed from distorted images: the
datasets come from `retrain.training.datasets`). Every `eval_step_interval`
steps it is scored on the validation vectors; when the validation loss stalls
the learning rate is cut, when it stalls longer training stops, and the
weights of the best evaluation are kept.

The head is built from built-in Keras layers only, so the exported model needs
no custom objects to load.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from retrain.data.sampling import sample_rows
from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow
from retrain.training import datasets
from retrain.training.callbacks import SELECTION_LOSS
from retrain.training.class_weights import class_weight_dict
from retrain.training.fit import FitLoop, fit
from retrain.training.settings import HeadSettings

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)

logger = logging.getLogger(__name__)

# Measured, with the command line's defaults (learning_rate 0.003, batch 100,
# evaluation every 10 steps, 4000 steps at most), against scikit-learn's
# LogisticRegression on EfficientNet-Lite0 bottlenecks of the digits demo and
# of flowers128: the head matches or beats it on mean test accuracy over six
# splits, and stops after 700-2000 steps (a few seconds).
# L2 penalty on the kernel, per training example: the same penalty as
# LogisticRegression(C=1), whose summed loss carries 0.5 * ||W||^2.
L2_PER_EXAMPLE = 0.5
# Without a lower validation loss for PLATEAU_STEPS the learning rate drops
# tenfold (the head then settles into the minimum instead of hopping around
# it); after PATIENCE_STEPS training stops. Each is at least a few evaluations.
PLATEAU_STEPS = 200
PATIENCE_STEPS = 500


@dataclass
class TrainResult:
    """A trained head and how training went.

    head: keras.Model, float32 [batch, feature_dim] bottlenecks ->
        float32 [batch, num_classes] class probabilities (rows sum to 1).
    history: one dict per evaluation: step, learning_rate, loss, accuracy
        (training, averaged over the steps since the previous evaluation),
        val_loss, val_accuracy (None without a validation set), and the
        distinct and selection figures of `callbacks.HISTORY_KEYS` with
        "selection" ("distinct", "all" or None: what model selection compared).
    best_step: the step whose weights the head holds.
    stopped_early: True if early stopping ended training before the step budget.
    """

    head: keras.Model
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    stopped_early: bool = False


def build_head(feature_dim: int, num_classes: int, l2: float = 0.0) -> keras.Model:
    """The new layer: float32 [batch, feature_dim] -> float32 [batch, num_classes] probabilities."""
    regularizer = keras.regularizers.L2(l2) if l2 > 0 else None
    return keras.Sequential(
        [
            keras.Input((feature_dim,), name="bottleneck"),
            keras.layers.Dense(
                num_classes,
                activation="softmax",
                kernel_regularizer=regularizer,
                name="final_result",
            ),
        ],
        name="head",
    )


def train_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    settings: HeadSettings,
) -> TrainResult:
    """Trains a softmax layer on bottleneck arrays already in memory; see `fit_head`.

    Args:
      train_x: float32 [n, feature_dim] training bottlenecks.
      train_y: int [n] class indices in [0, num_classes).
      val_x, val_y: the same for validation; may be empty (n = 0), which
        turns early stopping off (a warning says so).
      num_classes: the head's output width.
      settings: HeadSettings. A positive validation_batch_size scores a random
        sample of that size, drawn once (with the seed) so that evaluations
        are comparable. Only the training loss is weighted by class_weights;
        validation loss (early stopping) is not.

    Raises:
      RetrainError for inconsistent shapes or labels out of range.
    """
    train_x, train_y = _check_arrays("train", train_x, train_y, num_classes, allow_empty=False)
    val_x, val_y = _check_arrays("val", val_x, val_y, num_classes, allow_empty=True)
    if val_x.shape[1:] != train_x.shape[1:] and len(val_x):
        raise RetrainError(
            "Validation bottlenecks must have as many features as training ones. "
            f"Received: train_x.shape={train_x.shape}, val_x.shape={val_x.shape}"
        )
    keras.utils.set_random_seed(settings.seed)  # before the dataset, whose shuffle draws from it
    training = datasets.array_training(train_x, train_y, settings.train_batch_size, settings.seed)
    validation = _validation_sample(val_x, val_y, settings.validation_batch_size, settings.seed)
    return fit_head(
        training,
        validation,
        settings,
        feature_dim=train_x.shape[1],
        num_classes=num_classes,
        train_count=len(train_x),
    )


def fit_head(
    training,
    validation: tuple,
    settings: HeadSettings,
    *,
    feature_dim: int,
    num_classes: int,
    train_count: int,
    description: str = "Training",
    checkpoint=None,
    after_checkpoint=(),
) -> TrainResult:
    """Trains a softmax layer on a stream of bottlenecks, with early stopping on validation loss.

    Args:
      training: endless tf.data.Dataset of (float32 [train_batch_size,
        feature_dim] bottlenecks, int64 [train_batch_size] labels): cached
        vectors or vectors of distorted images (`retrain.training.datasets`).
      validation: (float32 [k, feature_dim], int64 [k]), optionally with a
        third item, the DistinctValidation of those k rows
        (`retrain.evaluation.distinct_validation`), whose distinct images then
        decide early stopping and the LR cut when there are enough of them;
        k = 0 turns early stopping off (a warning says so).
      settings: HeadSettings (validation_batch_size is not used here: the
        validation arrays are already the sample). Training runs in whole
        intervals of eval_step_interval steps, so the step budget is rounded
        up to a multiple of it; summaries_dir's event files of an earlier run
        are deleted first.
      feature_dim, num_classes: the head's input and output widths.
      train_count: training images (the L2 penalty is per example).
      description: the progress bar's label.
      checkpoint: None or a `checkpoints.Checkpoint`, see `fit.FitLoop` (an
        evaluation interval is an epoch there; early stopping restarts its
        count after a resume).
      after_checkpoint: Keras callbacks run after each epoch's checkpoint (see `fit.fit`).

    Returns:
      TrainResult whose head holds the weights of the best evaluation.
    """
    keras.utils.set_random_seed(settings.seed)
    interval = min(settings.eval_step_interval, settings.how_many_training_steps)
    evaluations = math.ceil(settings.how_many_training_steps / interval)
    head = build_head(feature_dim, num_classes, l2=L2_PER_EXAMPLE / train_count)
    # Running `interval` steps per call keeps Python out of the inner loop;
    # evaluation then dominates, and it is one pass over cached vectors.
    head.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=interval,
    )
    val_x = validation[0]
    early_stopping, callbacks = _early_stopping(len(val_x), interval, evaluations)
    class_weight = (
        None
        if settings.class_weights is None
        else class_weight_dict(settings.class_weights, num_classes)
    )
    loop = FitLoop(
        steps_per_epoch=interval,
        epochs=evaluations,
        batch_size=settings.train_batch_size,
        description=description,
        summaries_dir=settings.summaries_dir,
        progress=settings.progress,
        checkpoint=checkpoint,
    )
    history, _ = fit(
        head,
        training,
        tuple(validation) if len(val_x) else None,
        loop,
        callbacks=callbacks,
        class_weight=class_weight,
        after_checkpoint=after_checkpoint,
    )
    if early_stopping is None:
        return TrainResult(head, history, best_step=history[-1]["step"], stopped_early=False)
    # best_epoch counts from the first epoch, also when a checkpoint supplied some.
    return TrainResult(
        head,
        history,
        best_step=(early_stopping.best_epoch + 1) * interval,
        stopped_early=early_stopping.stopped_epoch > 0,
    )


def _early_stopping(validation_count: int, interval: int, evaluations: int):
    """(EarlyStopping or None, the callbacks list): the LR cut and early stop on validation loss."""
    if not validation_count:
        logger.warning(
            "The validation set is empty: no early stopping, training runs all %d steps "
            "and keeps the last weights. Raise validation_percentage to enable it.",
            evaluations * interval,
        )
        return None, []
    early_stopping = keras.callbacks.EarlyStopping(
        monitor=SELECTION_LOSS,
        mode="min",
        patience=max(5, math.ceil(PATIENCE_STEPS / interval)),
        restore_best_weights=True,
    )
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor=SELECTION_LOSS,
        mode="min",
        factor=0.1,
        patience=max(2, math.ceil(PLATEAU_STEPS / interval)),
    )
    return early_stopping, [plateau, early_stopping]


def _check_arrays(name, x, y, num_classes, allow_empty):
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise RetrainError(
            f"{name}_x must be [n, feature_dim] and {name}_y [n]. "
            f"Received: {name}_x.shape={x.shape}, {name}_y.shape={y.shape}"
        )
    if not len(x) and not allow_empty:
        raise RetrainError(
            f"No bottlenecks to train on: add images. Received: {name}_x.shape={x.shape}"
        )
    if len(y) and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes):
        raise RetrainError(
            f"{name}_y must hold class indices in [0, {num_classes}). "
            f"Received: dtype={y.dtype}, range=[{y.min()}, {y.max()}]"
        )
    if not np.isfinite(x).all():
        raise RetrainError(f"{name}_x holds NaN or infinite values; rebuild the bottleneck cache.")
    return x, y.astype(np.int64)


def _validation_sample(val_x, val_y, size, seed):
    if size == -1 or size >= len(val_x):
        return val_x, val_y
    chosen = sample_rows(len(val_x), size, seed)
    return val_x[chosen], val_y[chosen]
