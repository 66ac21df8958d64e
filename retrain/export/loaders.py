"""Any exported classifier behind one interface: resized pixels in, probabilities out.

`load_pixel_classifier(graph)` opens a `.keras` file, a SavedModel folder or a
`.tflite` file and returns an object with

    input_size    int, the square side the pixels must have
    num_classes   int
    predict(pixels)  float32 [n, input_size, input_size, 3] RGB in [0, 255]
                     (`retrain.data.resizing.resize_to_input`) -> np.ndarray float32
                     [n, num_classes] probabilities

so `label_image` and the benchmarks decode and resize every format the same way.

Only the `.keras` path is safe for a file from anyone: `keras_file.load_classifier`
checks the archive and loads it with Keras's safe mode, running no code from
it (a legacy `.h5` model is refused). A SavedModel folder and a `.tflite` file
are programs by their formats' own rules (graph ops that read and write files,
custom ops): load them only from a trusted source.
"""

from __future__ import annotations

import os

from retrain.errors import RetrainError


class KerasPixelClassifier:
    """A .keras file from `classifier.save_classifier`, checked and loaded running no code from it."""

    def __init__(self, path):
        from retrain.export import classifier, keras_file

        self._model = keras_file.load_classifier(path)
        self.input_size = classifier.input_size(self._model)
        self.num_classes = int(self._model.output_shape[-1])

    def predict(self, pixels):
        return self._model.predict_on_batch(pixels)


def model_format(graph) -> str:
    """ "saved_model" for a folder, "tflite" for a TFLite flatbuffer, otherwise "keras"."""
    from retrain.export import tflite

    if os.path.isdir(graph):
        return "saved_model"
    # is_tflite opens the file: only a regular one (opening a FIFO blocks). Anything
    # else goes to the .keras loader, which refuses it without opening it.
    return "tflite" if os.path.isfile(graph) and tflite.is_tflite(graph) else "keras"


def load_pixel_classifier(graph):
    """The classifier in `graph` (see the module docstring); RetrainError naming it if unusable."""
    if not os.path.exists(graph):
        raise RetrainError(
            f"Model not found: {graph}. Pass the model.keras, model_<kind>.tflite or "
            f"SavedModel folder written by a retrain run. Received: graph={graph}"
        )
    kind = model_format(graph)
    if kind == "saved_model":
        from retrain.export.saved_model import PixelClassifier
    elif kind == "tflite":
        from retrain.export.tflite import PixelClassifier
    else:
        PixelClassifier = KerasPixelClassifier
    return PixelClassifier(graph)
