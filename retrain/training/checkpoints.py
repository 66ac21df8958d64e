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
from dataclasses import dataclass
from pathlib import Path

from retrain.files import digests

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """Where a fit loop checkpoints, and the `run_fingerprint` the checkpoint is valid for."""

    folder: Path
    fingerprint: str


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
            logger.warning(
                "%s resumes from the checkpoint in %s: %d of %d epochs were done.",
                description,
                folder,
                epoch,
                epochs,
            )
            return epoch
    elif folder.exists():
        logger.warning(
            "%s starts over: the checkpoint in %s is from other settings or images.",
            description,
            folder,
        )
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    temporary = folder / f".{RUN_FILE}.{os.getpid()}"
    temporary.write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
    os.replace(temporary, folder / RUN_FILE)
    return 0
