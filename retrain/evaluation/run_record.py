"""The record a run leaves in its output folder, from which the report is built.

A run saves, beside its model:

* `run_record.json`: the image folder, class names, settings, training history,
  the kept step, class weights, every image the run used (relative path,
  class index, split bucket) plus the images it skipped, and which validation
  images have no near-copy in training (`distinct_validation`; absent in
  records from before it);
* `probabilities.npz`: the exported model's (calibrated) class probabilities
  for the validation and test images (`validation`, `testing`: float32
  [n, k], rows in the order those images appear in the record) and their
  unknown scores (`validation_unknown_score`, `testing_unknown_score`:
  float32 [n]) and probabilities before calibration (`testing_uncalibrated`,
  float32 [n, k]); these are absent in records from before issue 24, like
  the record's `calibration` and `unknown`.

`save` writes both and `load` reads them back into a `RunRecord`, so
`python -m retrain.report OUTPUT_DIR` can rebuild the page without the cache,
the model or TensorFlow.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrain.errors import RetrainError
from retrain.files import atomic_write, received_files
from retrain.files.text_escapes import one_line, utf8

RECORD_FILE = "run_record.json"
PROBABILITIES_FILE = "probabilities.npz"
FORMAT_VERSION = 1
EVALUATED_SPLITS = ("validation", "testing")
# The arrays of probabilities.npz: RunRecord field -> (suffix of the split's
# name in the file, whether each image has one value per class or one value).
ARRAYS = {
    "probabilities": ("", True),
    "uncalibrated": ("_uncalibrated", True),
    "unknown_scores": ("_unknown_score", False),
}


@dataclass(frozen=True)
class RecordedImage:
    """One image of a record: its path relative to image_dir and its class index."""

    relative_path: str
    label_index: int


@dataclass
class RunRecord:
    """Everything the report needs from one run.

    images, splits: n relative paths (to image_dir) and split buckets;
    labels: int64 [n] class indices; probabilities: split -> float32 [m, k]
    for the images of that split, in record order; class_weights: k floats
    or None (unweighted loss); history: retrain.training.head.TrainResult.history;
    distinct_validation: None, or `DistinctValidation.record()` of the
    validation images (its "distances" in record order of that split).
    probabilities are the calibrated ones; calibration: None or a dict with
    at least "temperature" (> 0; it recovers the uncalibrated probabilities),
    such as `confidence_metrics.calibration_summary`'s; unknown: None or the detector
    dict (`confidence_metrics.detector_summary`); unknown_scores: split ->
    float32 [m] unknown scores of that split's images, in record order;
    uncalibrated: split -> float32 [m, k] probabilities before calibration
    (exact, where recovering them with the temperature is not: a temperature
    far below 1 saturates float32 probabilities at 0 and 1).
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
    distinct_validation: dict | None = None
    calibration: dict | None = None
    unknown: dict | None = None
    unknown_scores: dict[str, np.ndarray] = field(default_factory=dict)
    uncalibrated: dict[str, np.ndarray] = field(default_factory=dict)

    def array_shape(self, split: str, per_class: bool) -> tuple[int, ...]:
        """The shape of a split's array in probabilities.npz: [images, classes] or [images]."""
        rows = len(self.rows(split))
        return (rows, len(self.class_names)) if per_class else (rows,)

    def rows(self, split: str) -> np.ndarray:
        """Record rows (int64 indices) of the images in `split`, in record order."""
        return np.array([i for i, name in enumerate(self.splits) if name == split], dtype=np.int64)

    def entries(self, split: str) -> list[RecordedImage]:
        """The images of `split`, in record order (the rows of `probabilities[split]`)."""
        return [RecordedImage(self.images[row], int(self.labels[row])) for row in self.rows(split)]

    def distinct_mask(self) -> np.ndarray | None:
        """bool [validation images]: no near-copy in training, in record order; None if unknown."""
        if self.distinct_validation is None:
            return None
        distances = np.asarray(self.distinct_validation["distances"], dtype=np.float32)
        return distances > float(self.distinct_validation["threshold"])

    def counts(self) -> np.ndarray:
        """Images per class and split, int64 [k, 3] with columns training, validation, testing."""
        table = np.zeros((len(self.class_names), 3), dtype=np.int64)
        columns = {"training": 0, "validation": 1, "testing": 2}
        for label, split in zip(self.labels, self.splits):
            table[label, columns[split]] += 1
        return table


def save(record: RunRecord, output_dir) -> tuple[Path, Path]:
    """Writes run_record.json and probabilities.npz into output_dir; returns their paths.

    Paths (image_dir, every image and skipped file) are written as
    `text_escapes.one_line`, so a name that is not UTF-8 cannot stop the run;
    both files are replaced atomically (a link at their names is replaced,
    not followed).
    """
    out = Path(output_dir)
    arrays = {}
    for name, (suffix, per_class) in ARRAYS.items():
        for split, array in getattr(record, name).items():
            if split not in EVALUATED_SPLITS or np.shape(array) != record.array_shape(
                split, per_class
            ):
                shape = f"[images in {split}, classes]" if per_class else f"[images in {split}]"
                raise RetrainError(
                    f"{name}[{split!r}] must be {shape}. Received: shape={np.shape(array)}"
                )
            arrays[split + suffix] = np.asarray(array, np.float32)
    document = {
        "format_version": FORMAT_VERSION,
        "image_dir": one_line(record.image_dir),
        "class_names": list(record.class_names),
        "settings": record.settings,
        "history": record.history,
        "best_step": int(record.best_step),
        "stopped_early": bool(record.stopped_early),
        "class_weights": None
        if record.class_weights is None
        else [float(w) for w in record.class_weights],
        "images": [
            {"path": one_line(path), "label": int(label), "split": split}
            for path, label, split in zip(record.images, record.labels, record.splits)
        ],
        "skipped": [
            {"path": one_line(path), "reason": utf8(str(reason))} for path, reason in record.skipped
        ],
        "distinct_validation": record.distinct_validation,
        "calibration": record.calibration,
        "unknown": record.unknown,
    }
    record_path, probabilities_path = out / RECORD_FILE, out / PROBABILITIES_FILE
    # ensure_ascii (the default): settings keep any undecodable path exactly, as \udcNN.
    atomic_write.write_text(record_path, json.dumps(document, indent=1) + "\n")
    with atomic_write.atomic_path(probabilities_path) as temporary:
        np.savez_compressed(temporary, **arrays)
    return record_path, probabilities_path


def load(output_dir) -> RunRecord:
    """Reads the record of the run whose output folder is output_dir.

    The folder may come from someone else: only regular files of bounded
    size are read (retrain.files.received_files), the record is checked to be one
    a run could have written, and probabilities.npz is read without pickles
    and only after its arrays' headers give the shapes the record implies.

    Raises:
      RetrainError naming the folder or file when the record is missing,
      unreadable or not one retrain wrote.
    """
    out = Path(output_dir)
    record_path = out / RECORD_FILE
    if not out.is_dir():
        raise RetrainError(
            f"No such output folder: {out}. Pass the --output_dir of a retrain run. "
            f"Received: output_dir={output_dir}"
        )
    try:
        record = _from_document(json.loads(received_files.read_text(record_path)))
    except FileNotFoundError:
        raise RetrainError(
            f"{out} has no {RECORD_FILE}: it is not the output folder of a finished "
            f"retrain run (or one from before run records). Received: output_dir={output_dir}"
        ) from None
    except RetrainError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise RetrainError(
            f"Cannot read {record_path}: {type(error).__name__}: {error}. "
            "Rerun retrain to write it again."
        ) from None
    arrays = _load_probabilities(out, record)
    for name, (suffix, _) in ARRAYS.items():
        setattr(
            record,
            name,
            {
                split: arrays[split + suffix]
                for split in EVALUATED_SPLITS
                if split + suffix in arrays
            },
        )
    return record


def _from_document(document) -> RunRecord:
    """The RunRecord of a parsed run_record.json; ValueError/TypeError/KeyError if malformed."""
    images = document["images"]
    class_names = document["class_names"]
    if not isinstance(class_names, list) or not all(isinstance(name, str) for name in class_names):
        raise TypeError("class_names must be a list of strings")
    record = RunRecord(
        image_dir=str(document["image_dir"]),
        class_names=class_names,
        settings=dict(document["settings"]),
        images=[str(image["path"]) for image in images],
        labels=np.array([image["label"] for image in images], dtype=np.int64),
        splits=[image["split"] for image in images],
        history=[dict(entry) for entry in document["history"]],
        best_step=int(document["best_step"]),
        stopped_early=bool(document["stopped_early"]),
        class_weights=document["class_weights"],
        skipped=[(str(entry["path"]), str(entry["reason"])) for entry in document["skipped"]],
        # Records from before issue 23 have none.
        distinct_validation=_distinct_validation(document.get("distinct_validation")),
        # Records from before issue 24 have neither.
        calibration=_numbers(document.get("calibration"), "calibration", ("temperature",)),
        unknown=_numbers(
            document.get("unknown"), "unknown", ("threshold", "acceptance", "k", "reference_images")
        ),
    )
    if len(record.labels) and (record.labels.min() < 0 or record.labels.max() >= len(class_names)):
        raise ValueError(f"image labels must be in [0, {len(class_names)})")
    if not set(record.splits) <= {"training", *EVALUATED_SPLITS}:
        raise ValueError(
            f"unknown splits {sorted(set(record.splits) - {'training', *EVALUATED_SPLITS})}"
        )
    weights = record.class_weights
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(class_names)):
        raise ValueError("class_weights must be null or one number per class")
    mask = record.distinct_mask()
    if mask is not None and len(mask) != len(record.rows("validation")):
        raise ValueError("distinct_validation must hold one distance per validation image")
    if record.calibration is not None and not record.calibration["temperature"] > 0:
        raise ValueError("calibration's temperature must be positive")
    return record


def _distinct_validation(value) -> dict | None:
    """The record's distinct_validation: None, or a dict with numeric distances and threshold."""
    if value is None:
        return None
    distances = np.asarray(value["distances"], dtype=np.float64)  # ValueError if not numbers
    if distances.ndim != 1 or not np.isfinite(float(value["threshold"])):
        raise ValueError("distinct_validation must hold a list of distances and a threshold")
    return dict(value)


def _numbers(value, name: str, keys: tuple[str, ...]) -> dict | None:
    """None, or the dict `value` whose `keys` hold finite numbers; ValueError otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(value.get(key), (int, float)) and np.isfinite(value[key]) for key in keys
    ):
        raise ValueError(f"{name} must be null or a dict with numbers {', '.join(keys)}")
    return dict(value)


def _npy_header(archive: zipfile.ZipFile, member: str):
    """(shape, dtype) from the .npy header of a zip member; its data is not read."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        if version not in readers:
            raise ValueError(
                f"{member} has .npy format version {version}, not one numpy's savez writes"
            )
        shape, _, dtype = readers[version](handle)
    return shape, dtype


def _load_probabilities(out: Path, record: RunRecord) -> dict[str, np.ndarray]:
    """probabilities.npz of `out`: {name in the file: array} (see ARRAYS), e.g.
    "testing" float32 [test images, classes], "testing_unknown_score" float32
    [test images]; the arrays of issue 24 are absent in records from before it.

    The file is read whole (bounded by the shapes the record implies) and each
    member's .npy header is checked before its data is: a small compressed
    file that claims a huge array is refused, never expanded.
    """
    path = out / PROBABILITIES_FILE
    expected = {
        split + suffix: record.array_shape(split, per_class)
        for suffix, per_class in ARRAYS.values()
        for split in EVALUATED_SPLITS
    }
    largest = sum(4 * int(np.prod(shape)) for shape in expected.values())
    try:
        # Compression can only shrink float32 rows much; 2x + 1 MB allows for any overhead.
        data = received_files.read_bytes(path, limit=2 * largest + (1 << 20))
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            for name in archive.files:
                if name not in expected:
                    raise ValueError(f"unexpected array {name!r}")
                shape, dtype = _npy_header(archive.zip, name + ".npy")
                if shape != expected[name] or dtype != np.float32:
                    raise ValueError(
                        f"{name} is {dtype} {shape}; the record implies float32 {expected[name]}"
                    )
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise RetrainError(
            f"{out} has {RECORD_FILE} but no {PROBABILITIES_FILE}. Rerun retrain to write it again."
        ) from None
    except RetrainError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise RetrainError(
            f"Cannot read {path}: {error}. Rerun retrain to write it again."
        ) from None
