"""The training settings, built once from a Config and passed whole.

`HeadSettings` drive the new softmax layer's fit, `FineTuneSettings` the
fine-tuning of head + backbone, `DistortionSettings` the random distortions of
the training images; `RunOptions` carries what a run adds to the first two
(TensorBoard folder, progress bars, class weights). Each is checked once,
where it is built; the functions that take them never re-check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from retrain.config import DISTORTION_FIELDS, check_setting
from retrain.data import distortions

# The Config fields HeadSettings copies under the same names, in the order they are checked.
_HEAD_FLAGS = (
    "how_many_training_steps",
    "train_batch_size",
    "eval_step_interval",
    "learning_rate",
    "validation_batch_size",
    "seed",
)
# The FineTuneSettings fields that are Config's fine_tune_<name>, checked in this order.
_FINE_TUNE_FLAGS = (
    "layers",
    "epochs",
    "learning_rate",
    "batch_size",
    "warmup_epochs",
    "layer_decay",
    "weight_decay",
    "label_smoothing",
)


@dataclass(frozen=True)
class RunOptions:
    """What a run adds to its Config's training flags, shared by the head and fine-tuning.

    summaries_dir: TensorBoard folder, or None.
    progress: progress bars on stderr.
    class_weights: float [num_classes] training-loss weight of each class, or None.
    """

    summaries_dir: str | None = None
    progress: bool = True
    class_weights: np.ndarray | None = None


@dataclass(frozen=True)
class HeadSettings:
    """How the head is trained (the command line's flags of the same names).

    how_many_training_steps: most optimizer steps, rounded up to whole
      evaluation intervals.
    learning_rate: Adam's initial rate (cut tenfold when the validation loss stalls).
    train_batch_size: bottlenecks per step.
    validation_batch_size: validation bottlenecks scored at each evaluation;
      -1 = all of them, a positive value a sample drawn once with `seed`.
    eval_step_interval: steps between evaluations.
    seed: initial weights and shuffles.
    summaries_dir: TensorBoard folder, or None.
    progress: a progress bar on stderr.
    class_weights: float [num_classes] training-loss weight of each class, or None.
    """

    how_many_training_steps: int
    learning_rate: float
    train_batch_size: int
    eval_step_interval: int
    seed: int
    validation_batch_size: int = -1
    summaries_dir: str | None = None
    progress: bool = True
    class_weights: np.ndarray | None = None

    def __post_init__(self):
        for name in _HEAD_FLAGS:
            check_setting(name, getattr(self, name))

    @classmethod
    def from_config(cls, config, options: RunOptions = RunOptions()) -> HeadSettings:
        """The head's flags of `config` (the fields' own names), with the run's `options`."""
        return _from_config(cls, config, {name: name for name in _HEAD_FLAGS}, options)


@dataclass(frozen=True)
class FineTuneSettings:
    """How head + backbone are fine-tuned (the --fine_tune_* flags).

    layers: top layers of `backbone.layers` to train; -1 = all.
    epochs: passes over the training images.
    learning_rate: the peak rate of the head and the top block
      (`retrain.training.learning_rates`): it rises linearly from 0 over
      warmup_epochs, then decays along a cosine to 0.
    batch_size: decoded images per step.
    warmup_epochs: epochs of the linear warm-up (fractions allowed).
    layer_decay: each block toward the input trains at this factor of the
      rate of the block above it (1 = one rate for all).
    weight_decay: AdamW's decoupled weight decay of the kernels.
    label_smoothing: share of the target spread over all classes.
    summaries_dir: TensorBoard folder (scalars in fine_tune_train and
      fine_tune_validation), or None.
    progress: a progress bar on stderr.
    class_weights: float [num_classes] training-loss weight of each class, or
      None, as the head was trained.
    """

    layers: int
    epochs: int
    learning_rate: float
    batch_size: int
    warmup_epochs: float = 0.0
    layer_decay: float = 1.0
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    summaries_dir: str | None = None
    progress: bool = True
    class_weights: np.ndarray | None = None

    def __post_init__(self):
        for name in _FINE_TUNE_FLAGS:
            check_setting(f"fine_tune_{name}", getattr(self, name), name)

    @classmethod
    def from_config(cls, config, options: RunOptions = RunOptions()) -> FineTuneSettings:
        """The --fine_tune_* flags of `config` (`layers` is fine_tune_layers ...), with `options`."""
        flags = {name: f"fine_tune_{name}" for name in _FINE_TUNE_FLAGS}
        return _from_config(cls, config, flags, options)


@dataclass(frozen=True)
class DistortionSettings:
    """The random distortions of training images (--flip_left_right, --random_crop, ...)."""

    flip_left_right: bool = False
    random_crop: float = 0
    random_scale: float = 0
    random_brightness: float = 0
    random_resized_crop: float = 0

    @classmethod
    def from_config(cls, config) -> DistortionSettings:
        return cls(**{name: getattr(config, name) for name in DISTORTION_FIELDS})

    def function(self, input_size: int):
        """`distortions.distortion_function` of these settings: None when none is asked for."""
        return distortions.distortion_function(input_size, **dataclasses.asdict(self))


def _from_config(cls, config, flags: dict[str, str], options: RunOptions):
    """`cls` with each field of `flags` (field -> Config field) read from `config`, plus `options`.

    The options' fields are read one by one, not with dataclasses.asdict,
    which would copy the class weights.
    """
    values = {field: getattr(config, name) for field, name in flags.items()}
    for field in dataclasses.fields(options):
        values[field.name] = getattr(options, field.name)
    return cls(**values)
