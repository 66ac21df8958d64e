"""TFLite exports of the fixed-size classifier: float32, float16 and full-integer int8.

Every kind takes float32 [1, size, size, 3] RGB in [0, 255], already resized
with `retrain.data.resizing.resize_to_input` (the batch dimension can be resized by
the interpreter), and returns float32 [1, classes] probabilities.

- float32: the weights frozen as they are (~13 MB for Lite0).
- float16: weights stored as float16, computed in float32 (half the size).
- int8: weights and activations int8, calibrated on a sample of training
  images; only the input and output stay float32 (a quantize op at each end).

The class names are embedded as a model metadata entry named
`retrain_labels` (UTF-8, one per line; `embedded_labels` reads them back)
and `labels.txt` is written beside the model as well. The entry is plain
TFLite `Model.metadata`, not the TFLite Support `ModelMetadata` schema, whose
writer package does not install on current Python versions.

A .tflite file is a program too: a flatbuffer can name custom ops that the
interpreter runs, and its buffers are trusted as they are. Run only files
from a trusted source (`.keras` is the format to take from others).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrain.data import pixel_batches
from retrain.engines import litert
from retrain.errors import RetrainError
from retrain.files import atomic_write
from retrain.quiet_tensorflow import import_tensorflow

# Imported here, quietly, before the TFLite schema imports below can import it noisily.
import_tensorflow()

LABELS_METADATA = "retrain_labels"
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


def with_labels(model: bytes, class_names: list[str]) -> bytes:
    """`model` with the class names added as the `retrain_labels` metadata entry."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    content = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(
        "".join(f"{name}\n" for name in class_names).encode("utf-8"), np.uint8
    )
    content.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = LABELS_METADATA
    entry.buffer = len(content.buffers) - 1
    content.metadata = [*(content.metadata or []), entry]
    return flatbuffer_utils.convert_object_to_bytearray(content)


def embedded_labels(model: bytes) -> list[str] | None:
    """The class names in the `retrain_labels` metadata entry, or None without one."""
    from tensorflow.lite.python import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    for index in range(root.MetadataLength()):
        entry = root.Metadata(index)
        if entry.Name() == LABELS_METADATA.encode():
            return bytes(root.Buffers(entry.Buffer()).DataAsNumpy()).decode("utf-8").splitlines()
    return None


def save_tflite(fixed, kind: str, class_names: list[str], path, calibration=None) -> Path:
    """Converts, embeds the labels and writes `path` atomically; returns the path."""
    model = with_labels(litert.convert(fixed, kind, calibration), class_names)
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
    """A .tflite file from `save_tflite`, run by LiteRT (ai-edge-litert) or TensorFlow's interpreter."""

    def __init__(self, path):
        try:
            self._interpreter = litert.open_interpreter(path)
        except (ValueError, RuntimeError) as error:
            raise RetrainError(
                f"Cannot load TFLite model {path}: {str(error).splitlines()[0]}. "
                f"Re-export it with a retrain run. Received: graph={path}"
            ) from None
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.input_size = int(self._input["shape"][1])
        self.num_classes = int(self._output["shape"][-1])

    def predict(self, pixels):
        """float32 [n, size, size, 3] -> np.ndarray float32 [n, num_classes]."""
        pixels = np.asarray(pixels, np.float32)
        if self._interpreter.get_input_details()[0]["shape"][0] != len(pixels):
            self._interpreter.resize_tensor_input(self._input["index"], pixels.shape)
            self._interpreter.allocate_tensors()
        self._interpreter.set_tensor(self._input["index"], pixels)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"]).copy()
