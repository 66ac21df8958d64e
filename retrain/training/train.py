"""Fitting: the new softmax layer, and the one fit loop every training path uses.

The head is one Dense layer with a softmax, trained with Adam on shuffled
mini-batches of bottlenecks (cached, or computed from distorted images: the
datasets come from `retrain.training.training_data`). Every `eval_step_interval` steps it is scored on
the validation vectors; when the validation loss stalls the learning rate is
cut, when it stalls longer training stops, and the weights of the best
evaluation are kept.

The head is built from built-in Keras layers only, so the exported model needs
no custom objects to load.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.training import checkpoints, training_data
from retrain.config import check_setting
from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow
from retrain.data.sampling import sample_rows

tf = import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)
from tensorflow.core.framework import summary_pb2  # noqa: E402

log = logging.getLogger(__name__)

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
        val_loss, val_accuracy (None without a validation set).
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
            keras.layers.Dense(num_classes, activation="softmax",
                               kernel_regularizer=regularizer, name="final_result"),
        ],
        name="head",
    )


def train_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    *,
    how_many_training_steps: int,
    learning_rate: float,
    train_batch_size: int,
    validation_batch_size: int,
    eval_step_interval: int,
    seed: int,
    summaries_dir: str | None = None,
    progress: bool = True,
    class_weights: np.ndarray | None = None,
) -> TrainResult:
    """Trains a softmax layer on bottleneck arrays already in memory; see `fit_head`.

    Args:
      train_x: float32 [n, feature_dim] training bottlenecks.
      train_y: int [n] class indices in [0, num_classes).
      val_x, val_y: the same for validation; may be empty (n = 0), which
        turns early stopping off (a warning says so).
      validation_batch_size: validation bottlenecks scored at each evaluation;
        -1 = all of them. A positive value scores a random sample of that size,
        drawn once (with `seed`) so that evaluations are comparable.
      class_weights: float [num_classes] loss weight of each class (e.g.
        `balanced_class_weights`), or None for an unweighted loss. Only the
        training loss is weighted; validation loss (early stopping) is not.
      The other arguments are `fit_head`'s.

    Raises:
      RetrainError for inconsistent shapes, labels out of range or bad settings.
    """
    train_x, train_y = _check_arrays("train", train_x, train_y, num_classes, allow_empty=False)
    val_x, val_y = _check_arrays("val", val_x, val_y, num_classes, allow_empty=True)
    if val_x.shape[1:] != train_x.shape[1:] and len(val_x):
        raise RetrainError(
            "Validation bottlenecks must have as many features as training ones. "
            f"Received: train_x.shape={train_x.shape}, val_x.shape={val_x.shape}"
        )
    for name, value in (("how_many_training_steps", how_many_training_steps),
                        ("train_batch_size", train_batch_size),
                        ("eval_step_interval", eval_step_interval),
                        ("learning_rate", learning_rate),
                        ("validation_batch_size", validation_batch_size), ("seed", seed)):
        check_setting(name, value)
    keras.utils.set_random_seed(seed)  # before the dataset, whose shuffle draws from it
    training = training_data.array_training(train_x, train_y, train_batch_size, seed)
    return fit_head(training, _validation_sample(val_x, val_y, validation_batch_size, seed),
                    feature_dim=train_x.shape[1], num_classes=num_classes,
                    train_count=len(train_x), how_many_training_steps=how_many_training_steps,
                    learning_rate=learning_rate, train_batch_size=train_batch_size,
                    eval_step_interval=eval_step_interval, seed=seed,
                    summaries_dir=summaries_dir, progress=progress, class_weights=class_weights)


def fit_head(
    training,
    validation: tuple[np.ndarray, np.ndarray],
    *,
    feature_dim: int,
    num_classes: int,
    train_count: int,
    how_many_training_steps: int,
    learning_rate: float,
    train_batch_size: int,
    eval_step_interval: int,
    seed: int,
    summaries_dir: str | None = None,
    progress: bool = True,
    description: str = "Training",
    checkpoint=None,
    class_weights: np.ndarray | None = None,
) -> TrainResult:
    """Trains a softmax layer on a stream of bottlenecks, with early stopping on validation loss.

    Args:
      training: endless tf.data.Dataset of (float32 [train_batch_size,
        feature_dim] bottlenecks, int64 [train_batch_size] labels): cached
        vectors or vectors of distorted images (`retrain.training.training_data`).
      validation: (float32 [k, feature_dim], int64 [k]); k = 0 turns early
        stopping off (a warning says so).
      feature_dim, num_classes: the head's input and output widths.
      train_count: training images (the L2 penalty is per example).
      how_many_training_steps: most optimizer steps. Training runs in whole
        intervals of `eval_step_interval` steps, so the budget is rounded up to
        a multiple of it.
      learning_rate: Adam's initial learning rate (cut tenfold when the
        validation loss stalls).
      train_batch_size: bottlenecks per step (for the progress bar's images/s).
      eval_step_interval: steps between evaluations.
      seed: makes initial weights reproducible.
      summaries_dir: if set, TensorBoard scalars go to summaries_dir/train and
        summaries_dir/validation, against the step number; event files of an
        earlier run there are deleted first.
      progress: show a progress bar (images/s, ETA) on stderr.
      description: the progress bar's label.
      class_weights: float [num_classes] training-loss weight of each class, or None.
      checkpoint: None or (folder, fingerprint), see `fit` (an evaluation
        interval is an epoch there; early stopping restarts its count after
        a resume).

    Returns:
      TrainResult whose head holds the weights of the best evaluation.
    """
    keras.utils.set_random_seed(seed)
    interval = min(eval_step_interval, how_many_training_steps)
    evaluations = math.ceil(how_many_training_steps / interval)
    head = build_head(feature_dim, num_classes, l2=L2_PER_EXAMPLE / train_count)
    # Running `interval` steps per call keeps Python out of the inner loop;
    # evaluation then dominates, and it is one pass over cached vectors.
    head.compile(optimizer=keras.optimizers.Adam(learning_rate),
                 loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                 steps_per_execution=interval)
    val_x, val_y = validation
    callbacks = []
    early_stopping = None
    if len(val_x):
        early_stopping = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=max(5, math.ceil(PATIENCE_STEPS / interval)),
            restore_best_weights=True)
        callbacks += [keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.1, patience=max(2, math.ceil(PLATEAU_STEPS / interval))),
            early_stopping]
    else:
        log.warning("The validation set is empty: no early stopping, training runs all %d steps "
                    "and keeps the last weights. Raise validation_percentage to enable it.",
                    evaluations * interval)

    if class_weights is not None:
        class_weights = class_weight_dict(class_weights, num_classes)
    history, _ = fit(head, training, (val_x, val_y) if len(val_x) else None,
                     steps_per_epoch=interval, epochs=evaluations, batch_size=train_batch_size,
                     summaries_dir=summaries_dir, progress=progress, callbacks=callbacks,
                     description=description, checkpoint=checkpoint, class_weight=class_weights)
    if early_stopping is None:
        return TrainResult(head, history, best_step=history[-1]["step"], stopped_early=False)
    # best_epoch counts from the first epoch, also when a checkpoint supplied some.
    return TrainResult(head, history, best_step=(early_stopping.best_epoch + 1) * interval,
                       stopped_early=early_stopping.stopped_epoch > 0)


def fit(model: keras.Model, training, validation, *, steps_per_epoch: int, epochs: int,
        batch_size: int, summaries_dir: str | None, progress: bool, callbacks=(),
        description: str = "Training", checkpoint=None, run_names=("train", "validation"),
        class_weight=None):
    """The one fit loop of every path: a compiled model, an endless training dataset.

    Args:
      model: compiled keras.Model with an "accuracy" metric.
      training: endless tf.data.Dataset of (inputs, int64 labels) batches.
      validation: finite tf.data.Dataset of the same; or (inputs, labels)
        arrays, scored by `ValidationScores` (far cheaper for short epochs);
        or None.
      steps_per_epoch, epochs: Keras's; an "epoch" ends with an evaluation, a
        history entry and TensorBoard scalars.
      batch_size: images per step, for the progress bar's images/s and ETA.
      summaries_dir: TensorBoard folder or None; scalars go to its
        `run_names` sub-folders, against the step number.
      progress: show the progress bar on stderr.
      callbacks: further Keras callbacks (early stopping, ...).
      description: the progress bar's label.
      checkpoint: None, or (folder, fingerprint): the model and optimizer are
        saved in folder after every epoch (keras.callbacks.BackupAndRestore,
        two generations, so a kill mid-save leaves the previous one); a rerun
        whose fingerprint (`checkpoints.run_fingerprint`) matches resumes from it and says
        so, any other starts over. The folder is removed when fit finishes.
      run_names: TensorBoard sub-folders for training and validation scalars.
      class_weight: Keras's {class index: loss weight}, or None.

    Returns:
      (history, initial_epoch): one dict per epoch run here (see
      TrainResult.history), and the epochs a checkpoint supplied.
    """
    initial_epoch = 0
    if checkpoint is not None:
        folder, fingerprint = Path(checkpoint[0]), checkpoint[1]
        initial_epoch = checkpoints.resume_point(folder, fingerprint, epochs, description)
        callbacks = [*callbacks, keras.callbacks.BackupAndRestore(str(folder), double_checkpoint=True),
                     checkpoints.AfterCheckpoint(folder)]
    log_callback = EvaluationLog(steps_per_epoch, epochs, batch_size, summaries_dir, progress,
                                 description=description, run_names=run_names,
                                 initial_epoch=initial_epoch)
    callbacks = [log_callback, *callbacks]
    if isinstance(validation, tuple):
        # First, so that the log, early stopping and the LR schedule see its scores.
        callbacks.insert(0, ValidationScores(*validation))
        validation = None
    try:
        model.fit(training, steps_per_epoch=steps_per_epoch, epochs=epochs,
                  initial_epoch=initial_epoch, validation_data=validation,
                  callbacks=callbacks, shuffle=False, verbose=0,
                  class_weight=class_weight)
    finally:
        log_callback.close()
    return log_callback.history, initial_epoch


class ValidationScores(keras.callbacks.Callback):
    """Scores validation arrays at each epoch's end into ``logs`` as Keras would.

    ``val_loss`` is the model's loss with its regularization terms
    (``Model.compute_loss``) and ``val_accuracy`` the share of top-1 hits,
    the values ``validation_data`` gives. One compiled call on tensors kept
    in memory: Keras's own validation pass sets up a fresh iterator every
    epoch, about 25 ms, which dominated the head's 10-step epochs (a warm
    rerun spent more time validating than training).
    """

    def __init__(self, inputs: np.ndarray, labels: np.ndarray):
        super().__init__()
        self.inputs = tf.constant(inputs, dtype=tf.float32)
        self.labels = tf.constant(labels, dtype=tf.int64)
        self._score = None

    def on_train_begin(self, logs=None):
        model = self.model

        @tf.function
        def score():
            predictions = model(self.inputs, training=False)
            loss = model.compute_loss(x=self.inputs, y=self.labels, y_pred=predictions,
                                      training=False)
            hits = tf.equal(tf.argmax(predictions, axis=-1), self.labels)
            return loss, tf.reduce_mean(tf.cast(hits, tf.float32))

        self._score = score

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        loss, accuracy = self._score()
        logs["val_loss"] = float(loss)
        logs["val_accuracy"] = float(accuracy)


# tf.summary.scalar lives in the tensorboard package, which TensorFlow 2.21 no
# longer installs; a plain summary tagged for the scalars plugin is what it
# writes, and TensorBoard shows it the same way.
SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")).SerializeToString()
# (TensorBoard tag, history key); train and validation share tags so that
# TensorBoard draws them on one chart.
TRAIN_SCALARS = (("loss", "loss"), ("accuracy", "accuracy"), ("learning_rate", "learning_rate"))
VALIDATION_SCALARS = (("loss", "val_loss"), ("accuracy", "val_accuracy"))
# Most seconds between the event files' flushes during training (and at the end).
FLUSH_SECONDS = 5.0


class EvaluationLog(keras.callbacks.Callback):
    """Records each evaluation against its step; mirrors it to TensorBoard and a progress bar.

    The bar counts images, so it shows images/s and the time left.
    """

    def __init__(self, interval: int, epochs: int, batch_size: int, summaries_dir: str | None,
                 progress: bool, description: str = "Training", run_names=("train", "validation"),
                 initial_epoch: int = 0):
        super().__init__()
        self.interval = interval
        self.batch_size = batch_size
        self.history: list[dict] = []
        self.writers = {}
        if summaries_dir:
            # Like retrain.py, each run starts fresh logs: an earlier run's
            # events at the same steps would be drawn as one zig-zag line.
            for name in run_names:
                for old in Path(summaries_dir, name).glob("events.out.tfevents.*"):
                    old.unlink()
            self.writers = dict(zip(("train", "validation"), (
                tf.summary.create_file_writer(f"{summaries_dir}/{name}") for name in run_names)))
        self.flushed = time.monotonic()
        self.bar = None
        self.epoch_start = self.steps_shown = initial_epoch * interval
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=epochs * interval * batch_size, initial=self.steps_shown * batch_size,
                            desc=description, unit="img", unit_scale=True, leave=False,
                            smoothing=0.1)

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is not None:
            # With steps_per_execution, Keras reports the last step of each call.
            step = self.epoch_start + batch + 1
            self.bar.update((step - self.steps_shown) * self.batch_size)
            self.steps_shown = step

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = epoch * self.interval

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        # The rate the steps since the last evaluation used (callbacks after
        # this one may cut it).
        entry = {"step": (epoch + 1) * self.interval,
                 "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))}
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            entry[key] = float(logs[key]) if key in logs else None
        self.history.append(entry)
        for name, tags in (("train", TRAIN_SCALARS), ("validation", VALIDATION_SCALARS)):
            writer = self.writers.get(name)
            if writer is None or entry[tags[0][1]] is None:
                continue
            with writer.as_default(step=entry["step"]):
                for tag, key in tags:
                    tf.summary.write(tag, entry[key], metadata=SCALAR_METADATA)
        # A live TensorBoard sees the scalars within FLUSH_SECONDS; flushing
        # at every evaluation cost the head's short epochs several ms each.
        if self.writers and time.monotonic() - self.flushed > FLUSH_SECONDS:
            for writer in self.writers.values():
                writer.flush()
            self.flushed = time.monotonic()
        if self.bar is not None and entry["val_loss"] is not None:
            self.bar.set_postfix(val_loss=f"{entry['val_loss']:.4f}",
                                 val_accuracy=f"{entry['val_accuracy']:.3f}", refresh=False)

    def close(self):
        for writer in self.writers.values():
            writer.close()
        if self.bar is not None:
            self.bar.close()


def _check_arrays(name, x, y, num_classes, allow_empty):
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise RetrainError(
            f"{name}_x must be [n, feature_dim] and {name}_y [n]. "
            f"Received: {name}_x.shape={x.shape}, {name}_y.shape={y.shape}"
        )
    if not len(x) and not allow_empty:
        raise RetrainError(f"No bottlenecks to train on: add images. Received: {name}_x.shape={x.shape}")
    if len(y) and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes):
        raise RetrainError(
            f"{name}_y must hold class indices in [0, {num_classes}). "
            f"Received: dtype={y.dtype}, range=[{y.min()}, {y.max()}]"
        )
    if not np.isfinite(x).all():
        raise RetrainError(f"{name}_x holds NaN or infinite values; rebuild the bottleneck cache.")
    return x, y.astype(np.int64)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Loss weights float64 [num_classes], inversely proportional to class frequency.

    weight_c = n / (num_classes * n_c), as scikit-learn's class_weight="balanced":
    every class then contributes the same total weight, and the mean weight
    per image is 1. A class absent from labels gets weight 0.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return np.divide(len(labels), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)


def class_weight_dict(class_weights, num_classes) -> dict[int, float]:
    """Keras's {class index: weight} of float [num_classes] weights; RetrainError if malformed."""
    weights = np.asarray(class_weights, dtype=np.float64)
    if weights.shape != (num_classes,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise RetrainError(f"class_weights must be {num_classes} finite weights >= 0, one per class. "
                           f"Received: {class_weights!r}")
    return {index: float(weight) for index, weight in enumerate(weights)}


def _validation_sample(val_x, val_y, size, seed):
    if size == -1 or size >= len(val_x):
        return val_x, val_y
    chosen = sample_rows(len(val_x), size, seed)
    return val_x[chosen], val_y[chosen]
