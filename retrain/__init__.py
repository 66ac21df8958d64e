"""retrain: transfer learning from a folder of labelled photos, on a CPU.

A frozen ImageNet backbone turns every image into a bottleneck vector once
(cached in HDF5); only a new softmax layer is trained on those vectors.

The Python API (docs/python-api.md):

    result = retrain.train("flower_photos")        # -> retrain.RunResult
    classifier = retrain.load(result.output_dir)   # -> retrain.Classifier
    classifier.predict(["rose.jpg"])               # -> [retrain.Prediction]

`import retrain` stays light: the API's names are imported on first use, and
TensorFlow only when `train` or `load` runs.
"""

__version__ = "0.1.0"

# retrain's notes (INFO) reach stderr wherever it runs: see retrain.messages.
from retrain import messages  # noqa: E402, F401
from retrain.errors import RetrainError  # noqa: E402

# Public name -> the module defining it, imported on first access (PEP 562).
_API = {
    "train": "retrain.api.training",
    "RunResult": "retrain.api.training",
    "load": "retrain.api.classifier",
    "Classifier": "retrain.api.classifier",
    "Prediction": "retrain.api.classifier",
}

__all__ = ["RetrainError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'retrain' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
