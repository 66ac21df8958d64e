"""How fast the pixel paths run: images/s of the training steps, against the forward pass alone.

`StepRate` times the training steps of each epoch (from the epoch's start to
its last step's end, so the validation pass after it is not counted);
`rate_line` compares that rate with the forward-only rate of the validation
pass (decoding included on both sides, as the cache fill counts it), the
figure `retrain.presets.FINE_TUNE_STEP_COST` stands for.
"""

from __future__ import annotations

import time

from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)


class StepRate(keras.callbacks.Callback):
    """Seconds and images of the training steps run, summed over epochs; `images_per_second`."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        self.seconds = 0.0
        self.images = 0
        self._started = self._last = None
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = self._last = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += self._last - self._started
        self.images += self._steps * self.batch_size

    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 and self.images else None


def rate_line(training: float | None, forward: float | None) -> str | None:
    """'Fine-tuning trained at 37 images/s; the forward pass alone ran at 118 (3.2x)', or None."""
    if not training:
        return None
    line = f"Fine-tuning trained at {training:.1f} images/s"
    if forward:
        line += (
            f"; the forward pass alone (validation) ran at {forward:.1f} images/s: a training "
            f"step costs {forward / training:.1f}x a forward pass"
        )
    return line
