"""Checkpoints of a training run, and whether a rerun may resume from one.

The files themselves are written by keras.callbacks.BackupAndRestore (model
and optimizer after every epoch, two generations); `resume_point` decides,
from a fingerprint of the run's settings and images, whether a rerun resumes
from them or starts over, and says which in the log.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from retrain.files import digests
from retrain.cache.journal import pause_point
from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)

log = logging.getLogger(__name__)


class AfterCheckpoint(keras.callbacks.Callback):
    """The fault tests' hook: with RETRAIN_CACHE_PAUSE_AT=checkpoint-<folder name>:<epoch>, the
    process parks once that epoch's checkpoint is saved (see cache.journal.pause_point)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def on_epoch_end(self, epoch, logs=None):
        pause_point(f"checkpoint-{self.folder.name}", count=epoch + 1, marker=f"{self.folder}.paused")


def run_fingerprint(settings: dict, images: list) -> str:
    """Hex sha256 of what a checkpoint is valid for: settings and images.

    Args:
      settings: JSON-serialisable values that change the training.
      images: JSON-serialisable records of the training images (path, label,
        size, mtime), in a fixed order.
    """
    return digests.json_digest({"settings": settings, "images": images})


# Beside the files keras.callbacks.BackupAndRestore writes; it names the run
# the checkpoint belongs to.
RUN_FILE = "run.json"
EPOCH_FILE = "training_metadata.json"  # BackupAndRestore's: {"epoch": epochs done, ...}


def resume_point(folder: Path, fingerprint: str, epochs: int, description: str) -> int:
    """Keeps a checkpoint of this very run and returns its epoch, or clears the folder and returns 0."""
    try:
        previous = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        previous = None
    if previous == fingerprint:
        try:
            epoch = int(json.loads((folder / EPOCH_FILE).read_text(encoding="utf-8"))["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            epoch = 0
        if 0 < epoch < epochs:
            log.warning("%s resumes from the checkpoint in %s: %d of %d epochs were done.",
                        description, folder, epoch, epochs)
            return epoch
    elif folder.exists():
        log.warning("%s starts over: the checkpoint in %s is from other settings or images.",
                    description, folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    temporary = folder / f".{RUN_FILE}.{os.getpid()}"
    temporary.write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
    os.replace(temporary, folder / RUN_FILE)
    return 0
