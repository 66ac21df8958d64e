"""Keras callbacks of the fit loop: validation scores from arrays, and the evaluation log.

`ValidationScores` scores validation arrays held in memory at each epoch's end;
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
            loss = model.compute_loss(
                x=self.inputs, y=self.labels, y_pred=predictions, training=False
            )
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
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
).SerializeToString()
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
