"""The deployable classifier: resizing + backbone + trained head in one Keras file.

`build_classifier` chains a Resizing layer (the op extraction used, see
`retrain.data.resizing.resize_to_input`), the backbone (which normalises pixels
inside itself) and the head, so the saved model takes plain RGB images of any
size and no caller can preprocess them wrongly. The head's logits are divided
by the run's calibration temperature, folded into a copy of its Dense layer
(`calibrated_logits`: no new op in any format). With the test-time flip
(`--test_time_flip`) the model averages the logits of the picture and of its
left-right mirror (`classify`, `mirror`), from built-in layers only, so the
file still loads in safe mode. The Identity layer "bottleneck" holds the
picture's bottleneck vector, which the unknown score reads
(`fixed_size_classifier(..., with_vectors=True)`). `fixed_size_classifier` is
the same network without the resizing, at the backbone's input size: the one
model the SavedModel (`retrain.export.saved_model`) and TFLite
(`retrain.export.tflite`) exports share. Loading a saved file back is
`retrain.export.keras_file`'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrain.errors import RetrainError
from retrain.files import atomic_write
from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)

# The Identity layer holding the picture's bottleneck vector in an exported classifier.
BOTTLENECK = "bottleneck"


def build_classifier(
    backbone: keras.Model,
    head: keras.Model,
    input_size: int,
    test_time_flip: bool = False,
    temperature: float = 1.0,
) -> keras.Model:
    """Chains resizing, backbone and head into one model.

    Args:
      backbone: float32 [batch, input_size, input_size, 3] RGB in [0, 255] ->
        float32 [batch, feature_dim] bottlenecks.
      head: float32 [batch, feature_dim] -> float32 [batch, num_classes], a
        softmax Dense layer last (`retrain.training.head.build_head`).
      input_size: the backbone's square input side.
      test_time_flip: whether the model averages the logits of each picture
        and of its left-right mirror (see `classify`).
      temperature: the calibration temperature, folded into the head's weights.

    Returns:
      keras.Model: float32 [batch, height, width, 3] RGB in [0, 255], any
      height and width (one size per batch) -> float32 [batch, num_classes]
      class probabilities. Its layer BOTTLENECK holds the picture's
      bottleneck vector, float32 [batch, feature_dim] (what the unknown score uses).
    """
    images = keras.Input((None, None, 3), dtype="float32", name="image")
    resized = keras.layers.Resizing(
        input_size, input_size, interpolation="bilinear", antialias=True, name="resize"
    )(images)
    probabilities = classify(backbone, head, resized, test_time_flip, temperature)
    return keras.Model(images, probabilities, name="retrained_classifier")


def classify(
    backbone: keras.Model,
    head: keras.Model,
    pixels,
    test_time_flip: bool = False,
    temperature: float = 1.0,
):
    """Calibrated probabilities of resized pixels: softmax(logits / temperature), the logits
    the head's, of the pixels' bottleneck vector; with the flip the mean of those logits and
    of the mirrored pixels' (the backbone and head run twice, their weights shared).

    Averaging logits, not probabilities, keeps the calibration exact: the
    temperature divides the mean logits (`retrain.evaluation.calibration.calibrate`).

    pixels: a KerasTensor float32 [batch, size, size, 3]; returns a KerasTensor
    float32 [batch, num_classes].
    """
    logits = calibrated_logits(head, temperature)
    vectors = keras.layers.Identity(name=BOTTLENECK)(backbone(pixels))
    scores = logits(vectors)
    if test_time_flip:
        mirrored = logits(backbone(mirror(pixels)))
        scores = keras.layers.Average(name="test_time_flip")([scores, mirrored])
    return keras.layers.Activation("softmax", name="probabilities")(scores)


def calibrated_logits(head: keras.Model, temperature: float = 1.0) -> keras.layers.Dense:
    """A new linear Dense layer: the head's last (softmax) Dense layer's logits / temperature.

    Its weights are copies of the head's divided by temperature, so
    softmax(layer(x)) = softmax(head's logits(x) / temperature) exactly.
    """
    last = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)][-1]
    kernel, bias = last.get_weights()
    layer = keras.layers.Dense(kernel.shape[1], name="logits")
    layer.build((None, kernel.shape[0]))
    layer.set_weights([kernel / temperature, bias / temperature])
    return layer


def mirror(pixels):
    """The left-right mirror of a KerasTensor float32 [batch, size, size, 3], from built-in layers.

    No Lambda (which loading would refuse, see `retrain.export.keras_file`):
    the width axis is moved last, multiplied by the size x size anti-identity
    (a frozen Dense without bias; each output is one input times 1.0, so
    exact) and moved back. About 3 * size**3 multiply-adds per image (34M at
    224, some 8% of EfficientNet-Lite0's forward pass).
    """
    size = int(pixels.shape[2])
    reverse = keras.layers.Dense(size, use_bias=False, trainable=False, name="mirror_width")
    width_last = keras.layers.Permute((1, 3, 2), name="mirror_width_last")(pixels)
    mirrored = keras.layers.Permute((1, 3, 2), name="mirror_width_back")(reverse(width_last))
    reverse.set_weights([np.eye(size, dtype=np.float32)[::-1]])
    return mirrored


def fixed_size_classifier(classifier: keras.Model, with_vectors: bool = False) -> keras.Model:
    """The layers of a `build_classifier` model after its resizing, on a fixed-size input.

    The layers (and so the weights) are shared with `classifier`, not copied;
    a test-time flip stays in.

    Returns:
      keras.Model: float32 [batch, size, size, 3] RGB in [0, 255], already
      resized with `retrain.data.resizing.resize_to_input` -> float32 [batch,
      num_classes] class probabilities; size = `input_size(classifier)`. With
      with_vectors, two outputs: the probabilities and the bottleneck vectors
      float32 [batch, feature_dim] (see `has_vectors`).
    """
    size = input_size(classifier)
    resize = next(layer for layer in classifier.layers if isinstance(layer, keras.layers.Resizing))
    outputs = classifier.output
    if with_vectors:
        outputs = [outputs, classifier.get_layer(BOTTLENECK).output]
    # The graph from the resized tensor on, whatever its branches (the flip's two).
    after_resizing = keras.Model(resize.output, outputs)
    pixels = keras.Input((size, size, 3), dtype="float32", name="pixels")
    return keras.Model(pixels, after_resizing(pixels), name="retrained_classifier_fixed")


def has_vectors(model: keras.Model) -> bool:
    """Whether a classifier names its bottleneck vector (exports from before issue 24 do not)."""
    return any(layer.name == BOTTLENECK for layer in model.layers)


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
