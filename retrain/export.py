"""The deployable classifier: resizing + backbone + trained head in one Keras file.

`build_classifier` chains a Resizing layer (the op extraction used, see
`retrain.decode.resize_to_input`), the backbone (which normalises pixels
inside itself) and the head, so the saved model takes plain RGB images of any
size and no caller can preprocess them wrongly. `labels.txt` lists the class
names in output order, one per line; only "\n" ends a line, so names keep any
other character (see `check_class_names`). `fixed_size_classifier` is the
same network without the resizing, at the backbone's input size: the one model
the SavedModel (`retrain.saved_model`) and TFLite (`retrain.tflite`) exports
share.
"""

from __future__ import annotations

from pathlib import Path

from retrain import atomic_write
from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)


def build_classifier(backbone: keras.Model, head: keras.Model, input_size: int) -> keras.Model:
    """Chains resizing, backbone and head into one model.

    Args:
      backbone: float32 [batch, input_size, input_size, 3] RGB in [0, 255] ->
        float32 [batch, feature_dim] bottlenecks.
      head: float32 [batch, feature_dim] -> float32 [batch, num_classes].
      input_size: the backbone's square input side.

    Returns:
      keras.Model: float32 [batch, height, width, 3] RGB in [0, 255], any
      height and width (one size per batch) -> float32 [batch, num_classes]
      class probabilities.
    """
    images = keras.Input((None, None, 3), dtype="float32", name="image")
    resized = keras.layers.Resizing(input_size, input_size, interpolation="bilinear",
                                    antialias=True, name="resize")(images)
    probabilities = head(backbone(resized))
    return keras.Model(images, probabilities, name="retrained_classifier")


def fixed_size_classifier(classifier: keras.Model) -> keras.Model:
    """The layers of a `build_classifier` model after its resizing, on a fixed-size input.

    The layers (and so the weights) are shared with `classifier`, not copied.

    Returns:
      keras.Model: float32 [batch, size, size, 3] RGB in [0, 255], already
      resized with `retrain.decode.resize_to_input` -> float32 [batch,
      num_classes] class probabilities; size = `input_size(classifier)`.
    """
    size = input_size(classifier)
    pixels = keras.Input((size, size, 3), dtype="float32", name="pixels")
    outputs = pixels
    for layer in classifier.layers:
        if not isinstance(layer, (keras.layers.InputLayer, keras.layers.Resizing)):
            outputs = layer(outputs)
    return keras.Model(pixels, outputs, name="retrained_classifier_fixed")


def input_size(model: keras.Model) -> int:
    """The square side a classifier from `build_classifier` resizes images to."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Resizing):
            return int(layer.height)
    raise RetrainError(f"Model {model.name} has no Resizing layer: it was not made by retrain's export.")


def save_classifier(model: keras.Model, path) -> Path:
    """Writes the model to `path` (must end in .keras) atomically; returns the path.

    A crash mid-write leaves any previous file at `path` intact.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise RetrainError(f"The model file name must end in .keras. Received: path={path}")
    try:
        with atomic_write.atomic_path(path) as temporary:
            model.save(str(temporary))
    except OSError as error:
        raise RetrainError(f"Cannot write {path}: {error.strerror or error}.") from None
    return path


def load_classifier(path) -> keras.Model:
    """Loads a model written by `save_classifier`, without compiling it.

    Raises:
      RetrainError naming the file if it is missing or not a loadable model.
    """
    path = Path(path)
    if not path.is_file():
        raise RetrainError(f"Model file not found: {path}. Pass the .keras file written by a "
                           f"retrain run (default output/model.keras). Received: path={path}")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001  (zip, HDF5, JSON and Keras errors all mean "unusable")
        raise RetrainError(f"Cannot load model {path}: {type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'no details'}. "
                           "Re-export it with a retrain run.") from None


def check_class_names(class_names: list[str]) -> None:
    r"""Raise RetrainError unless every name can be a line of labels.txt and back.

    labels.txt separates names by "\n" only, so any other character, including
    the Unicode line separators (U+2028, U+2029, U+0085, \x0b, \x0c), tabs and
    repeated spaces, survives exactly. Refused: empty names, names with "\n" or
    "\r" (text readers turn "\r" into a line end) and names that are not valid
    Unicode (folder names whose bytes are not UTF-8).
    """
    if not class_names:
        raise RetrainError("Class names must be non-empty single-line strings; there are none. "
                           "Received: class_names=[]")
    for name in class_names:
        if not name or "\n" in name or "\r" in name:
            raise RetrainError(f"Class names must be non-empty single-line strings: rename the "
                               f"class folder. Received: class name {name!r}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise RetrainError(f"Class name {name!r} is not valid UTF-8 (the folder name's bytes "
                               "are in another encoding): rename the class folder.") from None


def write_labels(class_names: list[str], path) -> Path:
    r"""Writes class names, one per "\n"-ended line in output order (UTF-8), atomically."""
    check_class_names(class_names)
    path = Path(path)
    try:
        atomic_write.write_text(path, "".join(f"{name}\n" for name in class_names))
    except OSError as error:
        raise RetrainError(f"Cannot write {path}: {error.strerror or error}.") from None
    return path


def read_labels(path) -> list[str]:
    """The class names of a labels file, in output order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise RetrainError(f"Cannot read labels file {path}: {reason}. Pass the labels.txt written "
                           f"with the model. Received: path={path}") from None
    # Only "\n" ends a name: str.splitlines would also split at U+2028, U+0085,
    # \x0b, \x0c... which may be part of a class folder's name.
    names = text.split("\n")
    if names[-1] == "":
        names.pop()
    if not names or not all(names):
        raise RetrainError(f"Labels file {path} must list one class name per line, with no blank "
                           f"lines. Received {len(names)} lines.")
    return names
