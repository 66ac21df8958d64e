"""The deployable classifier: resizing + backbone + trained head in one Keras file.

`build_classifier` chains a Resizing layer (the op extraction used, see
`retrain.data.resize.resize_to_input`), the backbone (which normalises pixels
inside itself) and the head, so the saved model takes plain RGB images of any
size and no caller can preprocess them wrongly. `fixed_size_classifier` is the
same network without the resizing, at the backbone's input size: the one model
the SavedModel (`retrain.export.saved_model`) and TFLite (`retrain.export.tflite`)
exports share. Loading a saved file back is `retrain.export.keras_file`'s.
"""

from __future__ import annotations

from pathlib import Path

from retrain.errors import RetrainError
from retrain.files import atomic_write
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
    resized = keras.layers.Resizing(
        input_size, input_size, interpolation="bilinear", antialias=True, name="resize"
    )(images)
    probabilities = head(backbone(resized))
    return keras.Model(images, probabilities, name="retrained_classifier")


def fixed_size_classifier(classifier: keras.Model) -> keras.Model:
    """The layers of a `build_classifier` model after its resizing, on a fixed-size input.

    The layers (and so the weights) are shared with `classifier`, not copied.

    Returns:
      keras.Model: float32 [batch, size, size, 3] RGB in [0, 255], already
      resized with `retrain.data.resizing.resize_to_input` -> float32 [batch,
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
    raise RetrainError(
        f"Model {model.name} has no Resizing layer: it was not made by retrain's export."
    )


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
