"""Any exported classifier behind one interface: resized pixels in, probabilities out.

`load_pixel_classifier(graph, unknown=True)` opens a `.keras` file, a SavedModel
folder, a `.tflite` file or a `.onnx` file (run by ONNX Runtime, the [onnx]
extra) and returns an object with

    input_size    int, the square side the pixels must have
    num_classes   int
    unknown_threshold  float, or None when the model cannot say unknown (or
                     `unknown` is False): scores above it are unknown
    predict(pixels)  float32 [n, input_size, input_size, 3] RGB in [0, 255]
                     (`retrain.data.resizing.resize_to_input`) -> np.ndarray float32
                     [n, num_classes] probabilities
    predict_scored(pixels)  -> (the probabilities, np.ndarray float32 [n] unknown
                     scores, or None when unknown_threshold is None)

A model that cannot say unknown (exported before unknown detection, its
`.keras` sidecar missing or of another model file) still labels; one
warning names it.

so `label_image` and the benchmarks decode and resize every format the same way.

Only the `.keras` path is safe for a file from anyone: `keras_file.load_classifier`
checks the archive and loads it with Keras's safe mode, running no code from
it (a legacy `.h5` model is refused). A SavedModel folder and a `.tflite` file
are programs by their formats' own rules (graph ops that read and write files,
custom ops): load them only from a trusted source. A `.onnx` file is read once,
bounded, and refused with custom operators or external data files
(`onnx_file.read_model`) before ONNX Runtime runs it.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from retrain.errors import RetrainError

logger = logging.getLogger(__name__)

# A first call of at most this many pictures runs eagerly (op by op):
# tracing `predict_on_batch`'s graph cost 0.77 s against 0.35 s eager for one
# picture, but a traced call of 32 pictures then takes 0.65 s against 1.2 s
# eager, so every later call is traced.
EAGER_FIRST_CALL = 4


class KerasPixelClassifier:
    """A .keras file from `classifier.save_classifier`, checked and loaded running no code from it.

    With `unknown`, its detector is the sidecar `unknown_file.unknown_path(path)`
    (data, checked, bound to this model file) and the scores come from the
    vectors of the model's BOTTLENECK layer.
    """

    def __init__(self, path, unknown=True):
        from retrain.export import classifier, keras_file

        self._model = keras_file.load_classifier(path)
        self._called = False
        self.input_size = classifier.input_size(self._model)
        self.num_classes = int(self._model.output_shape[-1])
        self._detector = _sidecar_detector(self._model, path) if unknown else None
        self.unknown_threshold = None if self._detector is None else self._detector.threshold
        if self._detector is not None:
            import keras

            # The same layers, two outputs: probabilities and bottleneck vectors.
            self._scored = keras.Model(
                self._model.inputs,
                [self._model.output, self._model.get_layer(classifier.BOTTLENECK).output],
            )

    def predict(self, pixels):
        return self._outputs(self._model, pixels)

    def predict_scored(self, pixels):
        if self._detector is None:
            return self.predict(pixels), None
        probabilities, vectors = self._outputs(self._scored, pixels)
        return probabilities, self._detector.scores(vectors)

    def _outputs(self, model, pixels):
        """`model`'s outputs as numpy for float32 pixels; eager only for a small first call."""
        first, self._called = not self._called, True
        if first and len(pixels) <= EAGER_FIRST_CALL:
            import keras

            return keras.tree.map_structure(np.asarray, model(pixels, training=False))
        return model.predict_on_batch(pixels)


def _sidecar_detector(model, path):
    """The UnknownDetector of the .keras file `path` (its sidecar), or None with one warning."""
    from retrain.export import classifier, unknown_file

    if not classifier.has_vectors(model):
        logger.warning(
            "%s was exported before unknown detection (it has no bottleneck layer): "
            "labelling without calling pictures unknown.",
            path,
        )
        return None
    return unknown_file.load(unknown_file.unknown_path(path), path)


def model_format(graph) -> str:
    """ "saved_model" for a folder, "onnx" for a name ending in .onnx, "tflite" for a TFLite
    flatbuffer, otherwise "keras"."""
    from retrain.export import tflite

    if os.path.isdir(graph):
        return "saved_model"
    # ONNX files are protobuf, which has no magic bytes: the name says it, and the
    # ONNX loader checks the content (and refuses a FIFO without blocking on it).
    if str(graph).lower().endswith(".onnx"):
        return "onnx"
    # is_tflite opens the file: only a regular one (opening a FIFO blocks). Anything
    # else goes to the .keras loader, which refuses it without opening it.
    return "tflite" if os.path.isfile(graph) and tflite.is_tflite(graph) else "keras"


def load_pixel_classifier(graph, unknown=True):
    """The classifier in `graph` (see the module docstring); RetrainError naming it if unusable.

    unknown: whether it scores pictures for unknown (False: no detector is
    read, unknown_threshold is None and no warning is given)."""
    if not os.path.exists(graph):
        raise RetrainError(
            f"Model not found: {graph}. Pass the model.keras, model_<kind>.tflite, model.onnx "
            f"or SavedModel folder written by a retrain run. Received: graph={graph}"
        )
    kind = model_format(graph)
    if kind == "saved_model":
        from retrain.export.saved_model import PixelClassifier
    elif kind == "tflite":
        from retrain.export.tflite import PixelClassifier
    elif kind == "onnx":
        from retrain.export.onnx_file import PixelClassifier
    else:
        PixelClassifier = KerasPixelClassifier
    return PixelClassifier(graph, unknown)
