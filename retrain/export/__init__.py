"""Exports of a trained classifier, and the loaders `label_image` uses.

    classifier    resizing + backbone + head as one Keras model; saving it
    keras_file    loading a .keras file from anyone, running no code from it
    labels        labels.txt: the class names in output order
    saved_model   the SavedModel export (with `decode_graph`, its image decoding)
    tflite        the TFLite exports
    loaders       any exported format behind one predict interface

The names below are the package's public API.
"""

from retrain.export.classifier import (
    build_classifier,
    fixed_size_classifier,
    input_size,
    save_classifier,
)
from retrain.export.keras_file import load_classifier
from retrain.export.labels import check_class_names, read_labels, write_labels

__all__ = [
    "build_classifier",
    "check_class_names",
    "fixed_size_classifier",
    "input_size",
    "load_classifier",
    "read_labels",
    "save_classifier",
    "write_labels",
]
