"""Classify images with an exported model: python -m retrain.label_image.

    python -m retrain.label_image --graph output/model.keras \\
        --labels output/labels.txt --image photo.jpg [more.jpg folder/ ...]

--graph takes any export of a run: model.keras, model_<kind>.tflite (run by
LiteRT when ai-edge-litert is installed, TensorFlow's interpreter otherwise),
the SavedModel folder or model.onnx (ONNX Runtime). The command is a thin
layer over the Python API, `retrain.load(graph, labels=...).iter_predict(...)`:
every format gets the same pixels, decoded with Pillow and resized as
extraction does.

Trust: a .keras file may come from anyone. It is loaded only if it is a zip
archive holding nothing but the layers retrain exports (no Lambda layer, no
custom object; a legacy .h5 model is refused), with Keras's safe mode on, so
nothing in it runs. A SavedModel folder or a .tflite file is a program by its
format's rules (graph ops that read and write files, custom ops): pass one
only from a source you trust.

For each image it prints the path, then, when the picture looks like none of
the classes (its unknown score past the model's threshold), a line
`  unknown (score S, threshold T)`, then the top-k classes as `label (score)`
lines, best first; `--json` prints one JSON document instead (each result
with `unknown` and `unknown_score`, and `unknown_threshold` at the top).
`--no-unknown` leaves the unknown line and fields out. A model without an
unknown detector (exported before it, or its .keras sidecar missing) labels
as before, with one warning. A folder stands for the images inside it
(recursively; files that are not images are ignored). With a folder or more
than one image a last line counts them: `N images: L labelled, U unknown,
F unreadable` (a `summary` object in --json).

Exit status: 0 when every image was labelled; 1 when some could not be
(each is reported on stderr and the others are still labelled); 2 for usage
errors and an unusable model or labels file (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from retrain import messages
from retrain.arguments import OneLineErrorParser, add_version, at_least, exit_without_teardown
from retrain.errors import RetrainError

logger = logging.getLogger("retrain.label_image")

EMPTY_FOLDER = "folder holds no supported images"


def parse_args(argv):
    parser = OneLineErrorParser(
        prog="python -m retrain.label_image",
        description="Print the top classes of images, using a model exported by retrain.",
    )
    add_version(parser)
    parser.add_argument(
        "--graph",
        required=True,
        help="the model.keras, model_<kind>.tflite, SavedModel folder or model.onnx written "
        "by retrain. A .keras file may come from anyone: it is checked and "
        "loaded running no code from it (legacy .h5 models and Lambda "
        "layers are refused). A SavedModel, .tflite or .onnx is a program (its ops "
        "can read and write files): pass one only from a trusted source.",
    )
    parser.add_argument("--labels", required=True, help="the labels.txt written with the model")
    parser.add_argument(
        "--image", required=True, nargs="+", help="image files or folders of images"
    )
    parser.add_argument(
        "--top_k",
        type=at_least(1, "a positive integer"),
        default=5,
        help="classes to print per image",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--unknown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="say which pictures look like none of the classes (the model's unknown "
        "score past its threshold); --no-unknown only lists the top labels",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Entry point of `python -m retrain.label_image`; returns the exit status."""
    args = parse_args(argv)
    messages.setup("label_image")
    from retrain.quiet_tensorflow import import_tensorflow

    # Keras's scikit-learn, pandas and matplotlib hooks cost ~2 s: see quiet_tensorflow.
    import_tensorflow(keras_extras=False)
    from retrain.api.classifier import load
    from retrain.data.decode import ImageDecodeError

    try:
        paths, failures = image_paths(args.image)
        classifier = load(args.graph, labels=args.labels, unknown=args.unknown)
    except RetrainError as error:
        logger.error("%s", error)
        return 2
    for path, reason in failures:
        logger.error("%s: %s", path, reason)
    report = Report(args.json, classifier.unknown_threshold)
    # The one decoding of Classifier.predict (file -> RGB -> resized, as extraction).
    for prediction in classifier.iter_predict(paths, args.top_k, on_error="keep"):
        if prediction.error is not None:
            error = ImageDecodeError(prediction.path, prediction.error)
            failures.append((prediction.path, str(error)))
            logger.error("%s", error)
        else:
            report.add(prediction.path, prediction)
    # Unreadable: missing files and images that failed to decode, not empty folders.
    unreadable = sum(reason != EMPTY_FOLDER for _, reason in failures)
    summary = None
    if len(paths) + unreadable > 1 or any(os.path.isdir(argument) for argument in args.image):
        summary = report.summary(unreadable)
    report.finish(args.graph, failures, summary)
    return 1 if failures else 0


class Report:
    """Prints each result (text now, or one JSON document at the end) and counts them."""

    def __init__(self, as_json: bool, threshold: float | None):
        self.as_json, self.threshold = as_json, threshold
        self.results, self.labelled, self.unknown = [], 0, 0

    def add(self, path, result):
        """Prints or keeps one image's retrain.Prediction."""
        self.unknown += bool(result.unknown)
        self.labelled += not result.unknown
        if self.as_json:
            entry = {
                "image": path,
                "predictions": [{"label": label, "score": s} for label, s in result.top],
            }
            if result.unknown is not None:
                entry.update(unknown=result.unknown, unknown_score=result.score)
            self.results.append(entry)
            return
        lines = [path]
        if result.unknown:
            lines.append(f"  unknown (score {result.score:.4f}, threshold {self.threshold:.4f})")
        lines.extend(f"  {label} ({score:.5f})" for label, score in result.top)
        print("\n".join(lines), flush=True)

    def summary(self, unreadable: int) -> dict:
        return {
            "images": self.labelled + self.unknown + unreadable,
            "labelled": self.labelled,
            "unknown": self.unknown,
            "unreadable": unreadable,
        }

    def finish(self, graph, failures, summary: dict | None):
        """The JSON document (--json) or the text summary line."""
        if not self.as_json:
            if summary is not None:
                print(
                    f"{summary['images']} images: {summary['labelled']} labelled, "
                    f"{summary['unknown']} unknown, {summary['unreadable']} unreadable"
                )
            return
        document = {"graph": graph}
        if self.threshold is not None:
            document["unknown_threshold"] = self.threshold
        document["results"] = self.results
        document["errors"] = [{"image": path, "error": reason} for path, reason in failures]
        if summary is not None:
            document["summary"] = summary
        json.dump(document, sys.stdout, indent=2)
        print()


def image_paths(arguments):
    """The image files named by the --image arguments, and (path, reason) for those missing.

    Folders are searched recursively and only regular files whose content is
    a supported image format are kept (``images.rejection``: a FIFO, socket,
    device or oversized file is left out without being read). Raises
    RetrainError when nothing is left.
    """
    paths, failures = [], []
    for argument in arguments:
        if os.path.isdir(argument):
            found = [path for path in sorted(_files_below(argument)) if _sniff(path)]
            if not found:
                failures.append((argument, EMPTY_FOLDER))
            paths.extend(found)
        elif os.path.exists(argument):
            paths.append(argument)
        else:
            failures.append((argument, "no such file or folder"))
    if not paths:
        raise RetrainError(
            "No images to label: "
            + "; ".join(f"{p}: {why}" for p, why in failures)
            + f". Received: image={list(arguments)}"
        )
    return paths, failures


def _files_below(folder):
    for root, dirnames, filenames in os.walk(folder):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        yield from (os.path.join(root, name) for name in filenames if not name.startswith("."))


def _sniff(path):
    from retrain.data import images

    return images.rejection(path) is None


def entry_point() -> None:
    """`python -m retrain.label_image` and `retrain-label-image`: main(), then a fast exit."""
    exit_without_teardown(main())


if __name__ == "__main__":
    entry_point()
