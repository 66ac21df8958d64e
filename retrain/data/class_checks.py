"""Checks of the discovered classes: enough of them, each with a usable image and a training image.

Raised as RetrainError naming the folder and what to change, before any long
work (after discovery) and again after failed decodes and the split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrain.errors import RetrainError

if TYPE_CHECKING:
    from retrain.config import Config
    from retrain.data.images import ImageList


def check_classes(image_list: ImageList) -> None:
    """At least two classes with names a labels file can hold, each with a usable image."""
    names = image_list.class_names
    from retrain import export  # deferred: it imports TensorFlow

    export.check_class_names(names)
    if len(names) < 2:
        raise RetrainError(
            f"Need at least two classes (sub-folders with images) in {image_list.image_dir}; "
            f"found {len(names)}: {names}. Add one sub-folder of images per class."
        )
    counts = {name: 0 for name in names}
    for entry in image_list.entries:
        counts[entry.label] += 1
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise RetrainError(
            f"Class folders with no usable images in {image_list.image_dir}: {empty}. "
            "Add images (JPEG, PNG, BMP, GIF, WebP) or remove the folders."
        )


def check_training_classes(class_names, training_entries, config: Config) -> None:
    """Every class needs a training image after the split and after failed decodes."""
    present = {entry.label for entry in training_entries}
    missing = [name for name in class_names if name not in present]
    if missing:
        raise RetrainError(
            f"Classes with no training image after the split: {missing}. Add images to them "
            "or lower --testing_percentage / --validation_percentage "
            f"(now {config.testing_percentage} / {config.validation_percentage})."
        )
