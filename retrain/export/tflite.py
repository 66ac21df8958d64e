"""TFLite exports of the fixed-size classifier: float32, float16 and full-integer int8.

Every kind takes float32 [1, size, size, 3] RGB in [0, 255], already resized
with `retrain.data.resizing.resize_to_input` (the batch dimension can be resized by
the interpreter), and returns float32 [1, classes] probabilities.

- float32: the weights frozen as they are (~13 MB for Lite0).
- float16: weights stored as float16, computed in float32 (half the size).
- int8: weights and activations int8, calibrated on a sample of training
  images; only the input and output stay float32 (a quantize op at each end).
  With the unknown score, the score's ops and the head stay float32
  (`unknown_graph.FLOAT_OPS`): the backbone is int8.

The class names are embedded as a model metadata entry named
`retrain_labels` (UTF-8, one per line; `embedded_labels` reads them back)
and `labels.txt` is written beside the model as well. With an unknown
detector (a model from `retrain.export.unknown_graph.scored_classifier`) the
file has a second output, `unknown_score` float32 [1], and a metadata entry
`retrain_unknown`: JSON {"threshold", "k", "acceptance", "method"}; a score
above the threshold means unknown (`unknown_threshold` reads it back). The entry is plain
TFLite `Model.metadata`, not the TFLite Support `ModelMetadata` schema, whose
writer package does not install on current Python versions.

A .tflite file is a program too: a flatbuffer can name custom ops that the
interpreter runs, and its buffers are trusted as they are. Run only files
from a trusted source (`.keras` is the format to take from others).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from retrain.data import pixel_batches
from retrain.engines import litert
from retrain.errors import RetrainError
from retrain.export import unknown_file, unknown_graph
from retrain.files import atomic_write
from retrain.quiet_tensorflow import import_tensorflow

# Imported here, quietly, before the TFLite schema imports below can import it noisily.
import_tensorflow()
logger = logging.getLogger(__name__)

LABELS_METADATA = "retrain_labels"
UNKNOWN_METADATA = "retrain_unknown"
# The retrain_unknown entry is a few numbers; a larger one is not ours.
_UNKNOWN_ENTRY_LIMIT = 4096
# Training images the int8 ranges are calibrated on; TensorFlow's guide suggests
# a few hundred, and more only slows the conversion.
CALIBRATION_IMAGES = 200
_TFLITE_IDENTIFIER = b"TFL3"


def is_tflite(path) -> bool:
    """Whether the file is a TFLite flatbuffer (identifier "TFL3" at bytes 4-8)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8)[4:8] == _TFLITE_IDENTIFIER
    except OSError:
        return False


def with_metadata(model: bytes, entries: dict[str, bytes]) -> bytes:
    """`model` with each (name, content) of `entries` as a metadata entry, replacing
    an entry of that name (its old buffer stays, unreferenced)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    content = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    for name, data in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data, np.uint8)
        content.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(content.buffers) - 1
        kept = [old for old in content.metadata or [] if _text(old.name) != name]
        content.metadata = [*kept, entry]
    return flatbuffer_utils.convert_object_to_bytearray(content)


def _text(name) -> str:
    """A flatbuffer string (bytes from the object API) as str."""
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def with_labels(model: bytes, class_names: list[str]) -> bytes:
    """`model` with the class names as its `retrain_labels` metadata entry."""
    return with_metadata(
        model, {LABELS_METADATA: "".join(f"{name}\n" for name in class_names).encode("utf-8")}
    )


def metadata_entry(model: bytes, name: str) -> bytes | None:
    """The content of the metadata entry `name`, or None without one."""
    from tensorflow.lite.python import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    for index in range(root.MetadataLength()):
        entry = root.Metadata(index)
        if entry.Name() == name.encode():
            return bytes(root.Buffers(entry.Buffer()).DataAsNumpy())
    return None


def embedded_labels(model: bytes) -> list[str] | None:
    """The class names in the `retrain_labels` metadata entry, or None without one."""
    content = metadata_entry(model, LABELS_METADATA)
    if content is None:
        return None
    # Only "\n" ends a name, as in labels.txt (splitlines would also split
    # at U+2028, \x0b... which a class folder's name may hold).
    return content.decode("utf-8").removesuffix("\n").split("\n")


def unknown_entry(detector) -> bytes:
    """The `retrain_unknown` metadata entry of an UnknownDetector: UTF-8 JSON."""
    return json.dumps(
        {
            "threshold": float(detector.threshold),
            "k": int(detector.k),
            "acceptance": float(detector.acceptance),
            "method": unknown_file.METHOD,
        }
    ).encode("utf-8")


def unknown_threshold(model: bytes, path) -> float | None:
    """The threshold in the `retrain_unknown` entry, None without one; RetrainError naming
    `path` when the entry is not the JSON `unknown_entry` writes."""
    content = metadata_entry(model, UNKNOWN_METADATA)
    if content is None:
        return None
    try:
        threshold = (
            json.loads(content.decode("utf-8"))["threshold"]
            if (len(content) <= _UNKNOWN_ENTRY_LIMIT)
            else None
        )
    except (UnicodeDecodeError, ValueError, TypeError, KeyError):
        threshold = None
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not (np.isfinite(threshold))
    ):
        raise RetrainError(
            f"The {UNKNOWN_METADATA} metadata entry of {path} is not a JSON object with a "
            f"finite threshold. Re-export the model with a retrain run. Received: graph={path}"
        )
    return float(threshold)


def save_tflite(
    fixed, kind: str, class_names: list[str], path, calibration=None, detector=None
) -> Path:
    """Converts, embeds the labels (and the detector's threshold) and writes `path`
    atomically; returns the path.

    fixed: `unknown_graph.deployable(...)`; detector: the UnknownDetector whose
    score it computes, given exactly when it has the score output.
    """
    if (detector is not None) != (len(fixed.outputs) == 2):
        raise ValueError("detector must be given exactly for a model with the score output")
    float_ops = unknown_graph.FLOAT_OPS if detector is not None else ()
    model = with_labels(litert.convert(fixed, kind, calibration, float_ops), class_names)
    if detector is not None:
        model = with_metadata(model, {UNKNOWN_METADATA: unknown_entry(detector)})
    try:
        return atomic_write.write_bytes(path, model)
    except OSError as error:
        raise RetrainError(f"Cannot write {path}: {error.strerror or error}.") from None


def calibration_pixels(paths, size: int) -> np.ndarray:
    """float32 [n, size, size, 3] of the images in `paths`, from extraction's dataset builder.

    Images that fail to decode are left out (extraction already reported them).
    """
    batches = pixel_batches.image_batches(paths, size, 32, drop_failed=True)
    return np.concatenate(
        [np.zeros((0, size, size, 3), np.float32), *(pixels.numpy() for _, pixels, _ in batches)]
    )


class PixelClassifier:
    """A .tflite file from `save_tflite`, run by LiteRT (ai-edge-litert) or TensorFlow's interpreter.

    unknown: whether to return its unknown scores (when it has them); one
    warning names a file without them.
    """

    def __init__(self, path, unknown=True):
        try:
            self._interpreter = litert.open_interpreter(path)
        except (ValueError, RuntimeError) as error:
            raise RetrainError(
                f"Cannot load TFLite model {path}: {str(error).splitlines()[0]}. "
                f"Re-export it with a retrain run. Received: graph={path}"
            ) from None
        self._input = self._interpreter.get_input_details()[0]
        outputs = self._interpreter.get_output_details()
        # The probabilities are [batch, classes]; the unknown score, when there is one, [batch].
        self._output = next(o for o in outputs if len(o["shape"]) == 2)
        scores = [o for o in outputs if len(o["shape"]) == 1]
        self.input_size = int(self._input["shape"][1])
        self.num_classes = int(self._output["shape"][-1])
        self.unknown_threshold = None
        if unknown:
            with open(path, "rb") as handle:
                threshold = unknown_threshold(handle.read(), path)
            if threshold is None or not scores:
                logger.warning(
                    "%s has no unknown score (exported before unknown detection, or without a "
                    "detector): its pictures are labelled, none can be called unknown.",
                    path,
                )
            else:
                self.unknown_threshold = threshold
        self._score = scores[0] if self.unknown_threshold is not None else None

    def predict(self, pixels):
        """float32 [n, size, size, 3] -> np.ndarray float32 [n, num_classes]."""
        return self.predict_scored(pixels)[0]

    def predict_scored(self, pixels):
        """float32 [n, size, size, 3] -> (float32 [n, num_classes], float32 [n] unknown scores
        or None without a detector)."""
        pixels = np.asarray(pixels, np.float32)
        if self._interpreter.get_input_details()[0]["shape"][0] != len(pixels):
            self._interpreter.resize_tensor_input(self._input["index"], pixels.shape)
            self._interpreter.allocate_tensors()
        self._interpreter.set_tensor(self._input["index"], pixels)
        self._interpreter.invoke()
        probabilities = self._interpreter.get_tensor(self._output["index"]).copy()
        if self._score is None:
            return probabilities, None
        return probabilities, self._interpreter.get_tensor(self._score["index"]).copy()
