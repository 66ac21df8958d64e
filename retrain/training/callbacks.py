"""Keras callbacks of the fit loop: validation scores, and the evaluation log.

`ValidationScores` scores validation arrays held in memory at each epoch's end,
`PixelValidationScores` decoded validation images (fine-tuning); both score
all validation images and the distinct ones (`distinct_validation`);
`EvaluationLog` records each evaluation against its step and mirrors it to
TensorBoard scalars and a progress bar.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from retrain.quiet_tensorflow import import_tensorflow

tf = import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)
from tensorflow.core.framework import summary_pb2  # noqa: E402

# The keys the validation callbacks add to Keras's logs at each epoch's end:
# val_loss / val_accuracy on every validation image (as Keras's own validation
# pass), distinct_val_loss / distinct_val_accuracy on the distinct ones (no
# near-copy in training, `evaluation.distinct_validation`; absent without a mask or when
# none is distinct), selection_loss / selection_accuracy (the distinct figures
# when `DistinctValidation.used`, else the plain ones: what early stopping, the
# learning-rate plateau and the best fine-tuning epoch compare), and
# selection_distinct (1.0 when the selection figures are the distinct ones, else 0.0).
SELECTION_LOSS = "selection_loss"


class ValidationScores(keras.callbacks.Callback):
    """Scores validation arrays at each epoch's end into ``logs`` as Keras would.

    ``val_loss`` is the model's loss with its regularization terms
    (``Model.compute_loss``) and ``val_accuracy`` the share of top-1 hits,
    the values ``validation_data`` gives; with a DistinctValidation the same
    on the distinct images, and the selection keys (see SELECTION_LOSS). One
    compiled call on tensors kept in memory: Keras's own validation pass sets
    up a fresh iterator every epoch, about 25 ms, which dominated the head's
    10-step epochs (a warm rerun spent more time validating than training).

    Args:
      inputs: float32 [n, ...] model inputs; labels: int [n] class indices.
      distinct: None, or a DistinctValidation of these n rows (its mask bool [n]).
    """

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, distinct=None):
        super().__init__()
        self.inputs = tf.constant(inputs, dtype=tf.float32)
        self.labels = tf.constant(labels, dtype=tf.int64)
        self.distinct = distinct
        self._score = None

    def on_train_begin(self, logs=None):
        model = self.model
        rows = _distinct_rows(self.distinct)

        @tf.function
        def score():
            predictions = model(self.inputs, training=False)
            return _scores(model, self.labels, predictions, rows)

        self._score = score

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(_logs(self._score(), self.distinct))


class PixelValidationScores(keras.callbacks.Callback):
    """The keys of ValidationScores, from one prediction pass over decoded images per epoch.

    For fine-tuning, whose backbone changes: the validation images go through
    the whole model (backbone + head) once per epoch, in inference mode, and
    the losses and accuracies come from those predictions.

    Args:
      dataset: finite tf.data.Dataset of (float32 [b, s, s, 3] RGB in
        [0, 255], int64 [b] labels) in validation-entry order
        (`datasets.decoded_evaluation`); n images in all.
      distinct: None, or a DistinctValidation of those n images, in that order.
    """

    def __init__(self, dataset, distinct=None):
        super().__init__()
        self.dataset = dataset
        self.distinct = distinct
        self._predict = None
        # Wall time and images of the prediction passes (decoding included):
        # the forward-only rate fine-tuning's step rate is compared with.
        self.seconds = 0.0
        self.images = 0

    def images_per_second(self) -> float | None:
        """Images a second of the prediction passes so far, or None before any."""
        return self.images / self.seconds if self.seconds > 0 and self.images else None

    def on_train_begin(self, logs=None):
        model = self.model
        self._predict = tf.function(
            lambda pixels: model(pixels, training=False), reduce_retracing=True
        )

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        predictions, labels = [], []
        started = time.perf_counter()
        for pixels, batch_labels in self.dataset:
            predictions.append(self._predict(pixels))
            labels.append(batch_labels)
        if not predictions:
            return
        self.seconds += time.perf_counter() - started
        self.images += sum(len(batch) for batch in labels)
        scores = _scores(
            self.model,
            tf.concat(labels, axis=0),
            tf.concat(predictions, axis=0),
            _distinct_rows(self.distinct),
        )
        logs.update(_logs(scores, self.distinct))


def _distinct_rows(distinct):
    """int64 [m] rows of the distinct images, or None (no mask, or none distinct)."""
    if distinct is None or not distinct.distinct:
        return None
    return tf.constant(np.flatnonzero(distinct.mask), dtype=tf.int64)


def _scores(model, labels, predictions, rows):
    """{"val_loss", "val_accuracy"[, "distinct_val_loss", "distinct_val_accuracy"]}: scalar tensors.

    labels: int64 [n]; predictions: float32 [n, classes]; rows: int64 [m]
    rows of the distinct images, or None. The losses are the model's compiled
    loss with its regularization terms, on those rows.
    """

    def loss_and_accuracy(y, y_pred):
        loss = model.compute_loss(y=y, y_pred=y_pred, training=False)
        hits = tf.equal(tf.argmax(y_pred, axis=-1), y)
        return loss, tf.reduce_mean(tf.cast(hits, tf.float32))

    scores = dict(zip(("val_loss", "val_accuracy"), loss_and_accuracy(labels, predictions)))
    if rows is not None:
        distinct = loss_and_accuracy(tf.gather(labels, rows), tf.gather(predictions, rows))
        scores.update(zip(("distinct_val_loss", "distinct_val_accuracy"), distinct))
    return scores


def _logs(scores, distinct) -> dict:
    """Float logs of `_scores`, with the selection keys (see SELECTION_LOSS)."""
    logs = {key: float(value) for key, value in scores.items()}
    selected = distinct is not None and distinct.used and "distinct_val_loss" in logs
    prefix = "distinct_val" if selected else "val"
    logs[SELECTION_LOSS] = logs[f"{prefix}_loss"]
    logs["selection_accuracy"] = logs[f"{prefix}_accuracy"]
    logs["selection_distinct"] = 1.0 if selected else 0.0
    return logs


# tf.summary.scalar lives in the tensorboard package, which TensorFlow 2.21 no
# longer installs; a plain summary tagged for the scalars plugin is what it
# writes, and TensorBoard shows it the same way.
SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
).SerializeToString()
# (TensorBoard tag, history key); train and validation share tags so that
# TensorBoard draws them on one chart.
TRAIN_SCALARS = (("loss", "loss"), ("accuracy", "accuracy"), ("learning_rate", "learning_rate"))
VALIDATION_SCALARS = (("loss", "val_loss"), ("accuracy", "val_accuracy"))
# The logs' figures each history entry keeps (None when absent).
HISTORY_KEYS = (
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "distinct_val_loss",
    "distinct_val_accuracy",
    "selection_loss",
    "selection_accuracy",
)
# Most seconds between the event files' flushes during training (and at the end).
FLUSH_SECONDS = 5.0


class EvaluationLog(keras.callbacks.Callback):
    """Records each evaluation against its step; mirrors it to TensorBoard and a progress bar.

    The bar counts images, so it shows images/s and the time left.
    """

    def __init__(
        self,
        interval: int,
        epochs: int,
        batch_size: int,
        summaries_dir: str | None,
        progress: bool,
        description: str = "Training",
        run_names=("train", "validation"),
        initial_epoch: int = 0,
    ):
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
            self.writers = dict(
                zip(
                    ("train", "validation"),
                    (
                        tf.summary.create_file_writer(f"{summaries_dir}/{name}")
                        for name in run_names
                    ),
                )
            )
        self.flushed = time.monotonic()
        self.bar = None
        self.epoch_start = self.steps_shown = initial_epoch * interval
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=epochs * interval * batch_size,
                initial=self.steps_shown * batch_size,
                desc=description,
                unit="img",
                unit_scale=True,
                leave=False,
                smoothing=0.1,
            )

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
        entry = {
            "step": (epoch + 1) * self.interval,
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
        }
        for key in HISTORY_KEYS:
            entry[key] = float(logs[key]) if key in logs else None
        # Which figures model selection compared: "distinct", "all", or None
        # (no validation).
        entry["selection"] = (
            None
            if "selection_distinct" not in logs
            else ("distinct" if logs["selection_distinct"] else "all")
        )
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
            self.bar.set_postfix(
                val_loss=f"{entry['val_loss']:.4f}",
                val_accuracy=f"{entry['val_accuracy']:.3f}",
                refresh=False,
            )

    def close(self):
        for writer in self.writers.values():
            writer.close()
        if self.bar is not None:
            self.bar.close()
