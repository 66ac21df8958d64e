"""The Python API: train on a folder of photos, load any export, label images.

    result = retrain.train("flower_photos", how_many_training_steps=500)
    result.test_accuracy, result.metrics, result.model
    classifier = retrain.load(result.output_dir)      # or model.onnx, model_int8.tflite...
    classifier.predict(["rose.jpg", pil_image, uint8_array], top_k=3)

    training    train(image_dir, **settings) -> RunResult
    settings    keyword arguments -> the command line's settings (names, types, close matches)
    classifier  load(path) -> Classifier; Classifier.predict(images) -> [Prediction]
    inputs      file paths, PIL images and arrays -> the pixels the model takes

Importing this package imports no TensorFlow: `train` and `load` import it
when called (docs/python-api.md has a notebook-style walk-through).
"""

from retrain.api.classifier import Classifier, Prediction, load
from retrain.api.training import RunResult, train

__all__ = ["Classifier", "Prediction", "RunResult", "load", "train"]
