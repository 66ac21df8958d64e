"""The record a run leaves in its output folder, from which the report is built.

A run saves, beside its model:

* `run_record.json`: the image folder, class names, settings, training history,
  the kept step, class weights, and every image the run used (relative path,
  class index, split bucket) plus the images it skipped;
* `probabilities.npz`: the trained head's class probabilities for the
  validation and test images (`validation`, `testing`: float32 [n, k], rows in
  the order those images appear in the record).

`save` writes both and `load` reads them back into a `RunRecord`, so
`python -m retrain.report OUTPUT_DIR` can rebuild the page without the cache,
the model or TensorFlow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.errors import RetrainError

RECORD_FILE = "run_record.json"
PROBABILITIES_FILE = "probabilities.npz"
FORMAT_VERSION = 1
EVALUATED_SPLITS = ("validation", "testing")


@dataclass
class RunRecord:
    """Everything the report needs from one run.

    images, splits: n relative paths (to image_dir) and split buckets;
    labels: int64 [n] class indices; probabilities: split -> float32 [m, k]
    for the images of that split, in record order; class_weights: k floats
    or None (unweighted loss); history: retrain.train.TrainResult.history.
    """

    image_dir: str
    class_names: list[str]
    settings: dict
    images: list[str]
    labels: np.ndarray
    splits: list[str]
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    stopped_early: bool = False
    class_weights: list[float] | None = None
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def rows(self, split: str) -> np.ndarray:
        """Record rows (int64 indices) of the images in `split`, in record order."""
        return np.array([i for i, name in enumerate(self.splits) if name == split], dtype=np.int64)

    def counts(self) -> np.ndarray:
        """Images per class and split, int64 [k, 3] with columns training, validation, testing."""
        table = np.zeros((len(self.class_names), 3), dtype=np.int64)
        columns = {"training": 0, "validation": 1, "testing": 2}
        for label, split in zip(self.labels, self.splits):
            table[label, columns[split]] += 1
        return table


def save(record: RunRecord, output_dir) -> tuple[Path, Path]:
    """Writes run_record.json and probabilities.npz into output_dir; returns their paths."""
    out = Path(output_dir)
    for split, array in record.probabilities.items():
        if split not in EVALUATED_SPLITS or array.shape != (len(record.rows(split)), len(record.class_names)):
            raise RetrainError(f"probabilities[{split!r}] must be [images in {split}, classes]. "
                               f"Received: shape={np.shape(array)}")
    document = {
        "format_version": FORMAT_VERSION,
        "image_dir": str(record.image_dir),
        "class_names": list(record.class_names),
        "settings": record.settings,
        "history": record.history,
        "best_step": int(record.best_step),
        "stopped_early": bool(record.stopped_early),
        "class_weights": None if record.class_weights is None else [float(w) for w in record.class_weights],
        "images": [{"path": path, "label": int(label), "split": split}
                   for path, label, split in zip(record.images, record.labels, record.splits)],
        "skipped": [{"path": path, "reason": reason} for path, reason in record.skipped],
    }
    record_path, probabilities_path = out / RECORD_FILE, out / PROBABILITIES_FILE
    record_path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    np.savez_compressed(probabilities_path, **{split: np.asarray(array, np.float32)
                                                for split, array in record.probabilities.items()})
    return record_path, probabilities_path


def load(output_dir) -> RunRecord:
    """Reads the record of the run whose output folder is output_dir.

    Raises:
      RetrainError naming the folder when the record is missing or unreadable.
    """
    out = Path(output_dir)
    record_path = out / RECORD_FILE
    if not out.is_dir():
        raise RetrainError(f"No such output folder: {out}. Pass the --output_dir of a retrain run. "
                           f"Received: output_dir={output_dir}")
    try:
        document = json.loads(record_path.read_text(encoding="utf-8"))
        images = document["images"]
        record = RunRecord(
            image_dir=document["image_dir"],
            class_names=document["class_names"],
            settings=document["settings"],
            images=[image["path"] for image in images],
            labels=np.array([image["label"] for image in images], dtype=np.int64),
            splits=[image["split"] for image in images],
            history=document["history"],
            best_step=document["best_step"],
            stopped_early=document["stopped_early"],
            class_weights=document["class_weights"],
            skipped=[(entry["path"], entry["reason"]) for entry in document["skipped"]],
        )
    except FileNotFoundError:
        raise RetrainError(f"{out} has no {RECORD_FILE}: it is not the output folder of a finished "
                           f"retrain run (or one from before run records). Received: output_dir={output_dir}"
                           ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RetrainError(f"Cannot read {record_path}: {type(error).__name__}: {error}. "
                           "Rerun retrain to write it again.") from None
    try:
        with np.load(out / PROBABILITIES_FILE, allow_pickle=False) as archive:
            record.probabilities = {split: archive[split] for split in archive.files}
    except FileNotFoundError:
        raise RetrainError(f"{out} has {RECORD_FILE} but no {PROBABILITIES_FILE}. "
                           "Rerun retrain to write it again.") from None
    except (OSError, ValueError) as error:
        raise RetrainError(f"Cannot read {out / PROBABILITIES_FILE}: {error}. "
                           "Rerun retrain to write it again.") from None
    return record
