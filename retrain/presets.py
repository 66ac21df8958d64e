"""Presets: named groups of setting values (`--preset fast|best`), and what `best` would cost.

A preset is a mapping Config field -> value. Precedence, lowest first:
Config defaults < the preset's values < the YAML file < command-line flags.
`config_from(settings, config_file)` is the one path from explicit settings
to a checked Config: the command line passes the flags it was given,
`retrain.train` its keyword arguments, both the `--config` YAML file.
`Config(preset="best")` built directly is the best preset too: Config leaves
the fields a preset sets at None until it fills them from its preset (see
`Config`), so only values given explicitly override the preset's.

At the end of a run on the cached head, `log_best_cost` says in one line what
`--preset best` would likely cost on the same images, from the extraction
speed measured on this machine and recorded with the bottleneck cache.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from retrain import config as config_lib

logger = logging.getLogger(__name__)

# The values of each preset. "fast" is Config's defaults (the head on cached
# vectors, in seconds); "best" fine-tunes the whole backbone with flips and
# random resized crops and averages each picture with its mirror at export.
# The numbers of "best" are chosen by measurement: docs/training-paths.md
# ("The best preset") has the table; change them here only.
_BEST = {
    "fine_tune_layers": -1,
    "fine_tune_epochs": 8,
    "flip_left_right": True,
    "random_resized_crop": 35.0,
    "random_crop": 0.0,
    "random_scale": 0.0,
    "test_time_flip": True,
}
# "fast" is the head on cached vectors: no fine-tuning, no distortion, no
# mirrored copy at export. Config's defaults for these fields are None, "the
# preset's value", so these are the defaults of a run that names no preset.
_FAST = {
    "fine_tune_layers": 0,
    "fine_tune_epochs": 3,
    "flip_left_right": False,
    "random_resized_crop": 0.0,
    "random_crop": 0.0,
    "random_scale": 0.0,
    "test_time_flip": False,
}
PRESETS: dict[str, dict[str, Any]] = {"fast": _FAST, "best": _BEST}

# Seconds of one fine-tuning image (decode, augment, forward and backward
# through the whole backbone, AdamW update) per second of one image extracted
# into the cache (decode and LiteRT forward). Measured on 2 cores (Intel Xeon,
# Sapphire Rapids): fine-tuning Lite0 at batch 32 trains 35 images/s where
# the LiteRT cache fill runs at 130-160 (docs/training-paths.md, "The best
# preset"); the Keras forward pass of the validation runs at about 100.
FINE_TUNE_STEP_COST = 4.0


def resolve(settings: dict[str, Any]) -> dict[str, Any]:
    """Config keyword arguments: the preset's values overridden by `settings`.

    settings: the explicitly given Config fields (YAML keys, then flags on
    top); its "preset" (default Config's) names the preset. Raises
    RetrainError naming a preset that does not exist.
    """
    name = settings.get("preset", config_lib.Config.preset)
    config_lib.check_setting("preset", name)
    return {**PRESETS[name], **settings, "preset": name}


def config_from(
    settings: dict[str, Any], config_file: str | os.PathLike | None = None
) -> config_lib.Config:
    """The checked Config of `settings` over the YAML file `config_file` (if any).

    Precedence, lowest first: Config defaults < the preset's values < the
    YAML file < `settings` (the command line's flags, or `retrain.train`'s
    keyword arguments). Raises RetrainError naming the first bad key or value
    (`config.load_yaml`, `config.validate`).
    """
    merged = dict(config_lib.load_yaml(config_file)) if config_file else {}
    merged.update(settings)
    config = make_config(**merged)
    config_lib.validate(config)
    return config


def make_config(**settings: Any) -> config_lib.Config:
    """A Config of the preset named by `preset` (default "fast") with `settings` on top.

    E.g. `make_config(image_dir="photos", preset="best", fine_tune_epochs=3)`.
    Values are not checked here; `config.validate` does that.
    """
    return config_lib.Config(**resolve(settings))


def fine_tune_seconds(
    training: int, validation: int, epochs: int, images_per_second: float, evaluated: int = 0
) -> float:
    """Estimated wall seconds of fine-tuning at a measured extraction speed.

    Each of `epochs` passes fine-tunes on the `training` images (each costing
    FINE_TUNE_STEP_COST extracted images) and runs the `validation` images
    forward once; after the last, the `evaluated` images (validation and
    test, predicted through the tuned backbone) run forward once more.
    """
    images = epochs * (training * FINE_TUNE_STEP_COST + validation) + evaluated
    return images / images_per_second


def duration(seconds: float) -> str:
    """'about 40 seconds', 'about 21 minutes', 'about 2.5 hours'."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} seconds"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} minutes"
    return f"about {seconds / 3600:.1f} hours"


def best_cost_line(training: int, validation: int, testing: int, images_per_second: float) -> str:
    """The one line saying what `--preset best` would cost on a set of this size."""
    epochs = PRESETS["best"]["fine_tune_epochs"]
    seconds = fine_tune_seconds(
        training, validation, epochs, images_per_second, evaluated=validation + testing
    )
    return (
        f"--preset best would fine-tune {training:,} training images for {epochs} epochs: "
        f"{duration(seconds)} here (measured {images_per_second:.0f} images/s extracting; "
        f"a fine-tuning step costs about {FINE_TUNE_STEP_COST:.1f}x)"
    )


def log_best_cost(config: config_lib.Config, buckets, images_per_second: float | None) -> None:
    """After a run on the cached head, the note (stderr) of what `--preset best` would cost.

    Says nothing after fine-tuning or distortions (their cost is known by
    then) or when the cache holds no measured speed (a cache filled before
    speeds were recorded, until a run extracts images into it).

    buckets: a data.buckets.Buckets; images_per_second: the cache's
    measured extraction speed (CacheReport.images_per_second).
    """
    if config.fine_tune_layers or config.distorted() or not images_per_second:
        return
    logger.info(
        "%s",
        best_cost_line(
            len(buckets.training),
            len(buckets.validation),
            len(buckets.testing),
            images_per_second,
        ),
    )
