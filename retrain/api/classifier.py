"""`retrain.load(path) -> Classifier`; `Classifier.predict(images) -> [Prediction]`.

`load` takes a run's output folder (its model.keras and labels.txt) or any
export: a `.keras` file, a SavedModel folder, a `.tflite` file or a `.onnx`
file (`retrain.export.loaders.load_pixel_classifier` runs each). The labels
come from `labels=`, else from the model itself (SavedModel assets, TFLite
and ONNX metadata), else from the labels.txt beside it.

Trust: as `label_image`, a `.keras` file is checked and loaded running no
code from it; a SavedModel, .tflite or .onnx file is a program by its
format's rules: load only one from a trusted source.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrain.api import inputs
from retrain.errors import RetrainError

# Images per forward pass (label_image's batch).
BATCH_SIZE = 32
ON_ERROR = ("raise", "keep")


@dataclass(frozen=True)
class Prediction:
    """What the model says about one image.

    top: up to top_k (label, probability) pairs, best first; probabilities in
      [0, 1] over all classes sum to 1. Empty when the image could not be read.
    unknown: True when the picture looks like none of the classes (its
      unknown score past the model's threshold), False when it looks like
      one, None when the model has no unknown detector (or load(unknown=False)).
    score: the unknown score (a cosine distance, higher = less like the
      training images), None without a detector.
    path: the file's path as given, None for a PIL image or an array.
    error: why the file could not be labelled (predict(on_error="keep")), else None.
    """

    top: list[tuple[str, float]]
    unknown: bool | None = None
    score: float | None = None
    path: str | None = None
    error: str | None = None

    @property
    def label(self) -> str | None:
        """The best label, None when the image could not be read."""
        return self.top[0][0] if self.top else None


class Classifier:
    """An exported model and its labels; `predict` labels images.

    class_names: list[str], the labels in output order.
    input_size: int, the square side the model's pixels are resized to.
    unknown_threshold: float, or None without an unknown detector.
    path: Path of the model file or folder.
    """

    def __init__(self, model, class_names: list[str], path: Path):
        self._model = model
        self.class_names = list(class_names)
        self.input_size: int = model.input_size
        self.unknown_threshold: float | None = model.unknown_threshold
        self.path = path

    def __repr__(self) -> str:
        return f"Classifier({str(self.path)!r}, {len(self.class_names)} classes)"

    def predict(
        self, images: Any, top_k: int = 5, *, on_error: Literal["raise", "keep"] = "raise"
    ) -> list[Prediction]:
        """One Prediction per image, in order.

        Args:
          images: one image or a list: file paths (str or os.PathLike), PIL
            images, or arrays [height, width, 3] of RGB values in [0, 255]
            (uint8, or integer or float; not [0, 1]); an array [n, h, w, 3] is
            n images. Files are decoded as training decoded them (EXIF
            orientation, alpha on white, 16-bit scaled), and every image is
            resized to the model's input as extraction resizes it.
          top_k: most (label, probability) pairs per image (capped at the classes).
          on_error: a file that cannot be read or decoded: "raise" a
            RetrainError naming it, or "keep" going and give it a Prediction
            with empty `top` and the reason in `error`.

        Raises:
          RetrainError: an unreadable file (on_error="raise"); an array of
            the wrong shape or outside [0, 255], or anything else that is not
            an image, naming its index in the list.
        """
        return list(self.iter_predict(images, top_k, on_error=on_error))

    def iter_predict(
        self, images: Any, top_k: int = 5, *, on_error: Literal["raise", "keep"] = "raise"
    ) -> Iterator[Prediction]:
        """`predict` one Prediction at a time, computed a batch at a time (long lists, streams)."""
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise RetrainError(f"top_k must be a positive integer. Received: top_k={top_k!r}")
        if on_error not in ON_ERROR:
            raise RetrainError(
                f"on_error must be 'raise' or 'keep'. Received: on_error={on_error!r}"
            )
        images = inputs.as_list(images)
        batch = []
        for image, (pixels, reason) in zip(
            images, inputs.pixels_of(images, self.input_size, BATCH_SIZE)
        ):
            path = os.fspath(image) if inputs.is_path(image) else None
            if reason is not None and on_error == "raise":
                from retrain.data.decode import ImageDecodeError

                raise ImageDecodeError(path, reason)
            batch.append((path, pixels, reason))
            if len(batch) == BATCH_SIZE:
                yield from self._labelled(batch, top_k)
                batch = []
        yield from self._labelled(batch, top_k)

    def _labelled(self, batch: Sequence, top_k: int) -> list[Prediction]:
        """Predictions of (path, float32 [size, size, 3] pixels or None, reason) records."""
        good = [pixels for _, pixels, reason in batch if reason is None]
        probabilities, scores = (
            self._model.predict_scored(np.stack(good)) if good else (np.zeros((0, 0)), None)
        )
        results, row = [], 0
        for path, _, reason in batch:
            if reason is not None:
                results.append(Prediction([], path=path, error=reason))
                continue
            best = np.argsort(-probabilities[row], kind="stable")[:top_k]
            top = [(self.class_names[i], float(probabilities[row][i])) for i in best]
            score = None if scores is None else float(scores[row])
            unknown = None if score is None else score > self.unknown_threshold
            results.append(Prediction(top, unknown, score, path))
            row += 1
        return results


def load(
    path: str | os.PathLike,
    *,
    labels: str | os.PathLike | Sequence[str] | None = None,
    unknown: bool = True,
) -> Classifier:
    """The classifier in `path`, ready to `predict`.

    Args:
      path: a run's output folder (holding model.keras), a .keras file, a
        SavedModel folder, a .tflite or a .onnx file.
      labels: a labels file or the list of class names in output order;
        default: the model's own (SavedModel, TFLite, ONNX), else the
        labels.txt beside the model.
      unknown: read the model's unknown detector (False: `Prediction.unknown`
        is None and no warning is given for a model without one).

    Raises:
      RetrainError: no model or labels found, a model that does not load, or
        labels that do not match the model's outputs.
    """
    from retrain.quiet_tensorflow import import_tensorflow

    import_tensorflow()
    from retrain.export import loaders

    given = None if labels is None else _given_labels(labels)  # read first: cheap, and checked
    graph = _model_file(Path(path))
    model = loaders.load_pixel_classifier(str(graph), unknown)
    names, source = given or _found_labels(graph, model)
    if model.num_classes != len(names):
        raise RetrainError(
            f"The model has {model.num_classes} outputs but {source} lists "
            f"{len(names)} labels: pass the labels file written "
            f"with this model. Received: graph={graph}, labels={source}"
        )
    return Classifier(model, names, graph)


def _model_file(path: Path) -> Path:
    """The model in `path`: model.keras in an output folder, else `path` itself."""
    if path.is_dir() and not (path / "saved_model.pb").exists():
        if not (path / "model.keras").is_file():
            raise RetrainError(
                f"{path} is neither a retrain output folder (no model.keras) nor a SavedModel "
                f"folder (no saved_model.pb). Pass a run's output_dir or a model file. "
                f"Received: path={path}"
            )
        return path / "model.keras"
    return path


def _given_labels(labels) -> tuple[list[str], Any]:
    """(the class names, their source) of load's `labels`: a file or a list of names."""
    from retrain.export.labels import check_class_names, read_labels

    if isinstance(labels, (str, os.PathLike)):
        return read_labels(labels), labels
    names = list(labels)
    check_class_names(names)
    return names, "labels"


def _found_labels(graph: Path, model) -> tuple[list[str], Any]:
    """(the class names, their source) the model carries, else of the labels.txt beside it."""
    from retrain.export.labels import read_labels

    embedded = _embedded_labels(graph, model)
    if embedded:
        return embedded, graph
    beside = (graph if graph.is_dir() else graph.parent) / "labels.txt"
    if not beside.is_file():
        raise RetrainError(
            f"No labels for {graph}: it carries none and there is no {beside}. Pass "
            f"labels= (the labels.txt written with the model). Received: path={graph}"
        )
    return read_labels(beside), beside


def _embedded_labels(graph: Path, model) -> list[str] | None:
    """The class names the model file carries (SavedModel assets, TFLite or ONNX metadata)."""
    from retrain.export import loaders

    if getattr(model, "class_names", None):  # loaders that read them (ONNX)
        return list(model.class_names)
    kind = loaders.model_format(str(graph))
    if kind == "saved_model" and (graph / "assets" / "labels.txt").is_file():
        from retrain.export.labels import read_labels

        return read_labels(graph / "assets" / "labels.txt")
    if kind == "tflite":
        from retrain.export import tflite

        return tflite.embedded_labels(graph.read_bytes())
    return None
