"""An ONNX file of retrain's (OUTPUT_DIR/model.onnx): its names, its metadata, read safely, run.

The file holds input `pixels` float32 [batch, size, size, 3] RGB in [0, 255],
already resized with `retrain.data.resizing.resize_to_input` (the
normalisation is inside), output `probabilities` float32 [batch, classes]
and, with an unknown detector, `unknown_score` float32 [batch] (above the
threshold: unknown). Its `metadata_props` hold `labels` (a JSON list of the
class names in output order), `retrain_version` and, with the score,
`unknown_threshold` (a number as text). `retrain.export.onnx_export` writes it.

Loading (`PixelClassifier`, for `label_image --graph model.onnx` and
`retrain.load`) reads the file once, bounded, from a regular file, and
refuses before ONNX Runtime sees it: an operator or opset outside the
standard ONNX domains (custom ops), model-local functions, and any tensor
kept in an external data file (which could name a file anywhere; retrain's
exports hold every weight inside). ONNX Runtime then runs the checked
bytes, not the path.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from retrain.errors import RetrainError
from retrain.extras import check_onnx_installed
from retrain.files import regular_file

logger = logging.getLogger(__name__)


INPUT = "pixels"


PROBABILITIES = "probabilities"


SCORE = "unknown_score"  # unknown_graph.SCORE, the name in every format


LABELS_KEY = "labels"


THRESHOLD_KEY = "unknown_threshold"


VERSION_KEY = "retrain_version"


# The standard operator sets; any other domain is a custom op library's.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


# Protobuf's limit for one message: an ONNX file larger than this keeps its weights
# in external data files, which retrain's exports never do.
MAX_MODEL_BYTES = 2**31 - 1


_METADATA_LIMIT = 2**20  # bytes of one metadata value read back


def session(content: bytes):
    """An ONNX Runtime CPU session of the model bytes, its notes below errors silenced."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about its optimisations
    return onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])


def read_model(path):
    """(bytes, onnx.ModelProto) of the ONNX file `path`, checked as the module docstring says.

    Raises RetrainError naming `path`: not a regular file of at most
    MAX_MODEL_BYTES, not an ONNX model, custom operators, or external data.
    """
    check_onnx_installed(f"Loading {path}")
    import onnx
    from google.protobuf.message import DecodeError

    content = _read_bounded(path)
    try:
        model = onnx.load_model_from_string(content)
        # Before the checker, which would look for external data files itself.
        _check_self_contained(model, path)
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, RuntimeError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise RetrainError(
            f"{path} is not a valid ONNX model ({reason}). Pass the model.onnx written by a "
            f"retrain run with --onnx. Received: graph={path}"
        ) from None
    return content, model


def _read_bounded(path) -> bytes:
    try:
        with regular_file.open_regular(path, follow_symlinks=True, limit=MAX_MODEL_BYTES) as (
            handle,
            _,
        ):
            return handle.read(MAX_MODEL_BYTES + 1)
    except regular_file.RefusedFile as refused:
        raise RetrainError(
            f"{path} is {refused.strerror}: pass the model.onnx file written by a retrain run "
            f"(a regular file of at most {MAX_MODEL_BYTES:,} bytes). Received: graph={path}"
        ) from None
    except OSError as error:
        raise RetrainError(f"Cannot read model {path}: {error.strerror or error}.") from None


def _check_self_contained(model, path) -> None:
    """RetrainError unless every operator is standard ONNX and every tensor is inside the file."""
    from onnx import TensorProto

    domains = {entry.domain for entry in model.opset_import}
    tensors = []
    for graph in _graphs(model.graph):
        domains.update(node.domain for node in graph.node)
        tensors.extend(graph.initializer)
        for sparse in graph.sparse_initializer:
            tensors.extend((sparse.values, sparse.indices))
        for node in graph.node:
            for attribute in node.attribute:
                tensors.extend([attribute.t, *attribute.tensors])
    custom = sorted(domains - STANDARD_DOMAINS)
    if custom or len(model.functions):
        what = f"custom operator domains {custom}" if custom else "model-local functions"
        raise RetrainError(
            f"{path} uses {what}, which retrain's ONNX exports never do; it is not run. "
            f"Received: graph={path}"
        )
    if any(tensor.data_location == TensorProto.EXTERNAL for tensor in tensors):
        raise RetrainError(
            f"{path} keeps weights in external data files, which retrain's ONNX exports never "
            f"do (they could name any file); it is not read. Received: graph={path}"
        )


def _graphs(graph):
    """The graph and every subgraph in its nodes' attributes (If, Loop, Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graphs(subgraph)


def metadata(model) -> dict[str, str]:
    """The model's metadata_props as a dict (values past 1 MB are left out: not ours)."""
    return {
        entry.key: entry.value
        for entry in model.metadata_props
        if len(entry.value) <= _METADATA_LIMIT
    }


def embedded_labels(model) -> list[str] | None:
    """The class names of the `labels` metadata entry, or None without a JSON list of strings."""
    try:
        labels = json.loads(metadata(model).get(LABELS_KEY, "null"))
    except ValueError:
        return None
    if isinstance(labels, list) and labels and all(isinstance(name, str) for name in labels):
        return labels
    return None


def unknown_threshold(model, path) -> float | None:
    """The `unknown_threshold` metadata entry, None without one; RetrainError naming `path`
    when it is not a finite number."""
    text = metadata(model).get(THRESHOLD_KEY)
    if text is None:
        return None
    try:
        threshold = float(text)
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold):
        raise RetrainError(
            f"The {THRESHOLD_KEY} metadata entry of {path} is not a finite number. Re-export "
            f"the model with a retrain run. Received: graph={path}"
        )
    return threshold


class PixelClassifier:
    """A model.onnx from `save_onnx`, checked by `read_model` and run by ONNX Runtime on the CPU.

    The interface of `retrain.export.loaders` (input_size, num_classes,
    unknown_threshold, predict, predict_scored), and class_names: the labels
    in its metadata (None without them). unknown: whether to return its
    unknown scores (when it has them); one warning names a file without them.
    """

    def __init__(self, path, unknown=True):
        content, model = read_model(path)
        try:
            self._session = session(content)
        except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types
            raise RetrainError(
                f"ONNX Runtime cannot load {path}: {str(error).splitlines()[0]}. "
                f"Re-export it with a retrain run. Received: graph={path}"
            ) from None
        self._input, self._outputs = _signature(self._session, path)
        self.input_size = int(self._input.shape[1])
        self.num_classes = int(self._session.get_outputs()[0].shape[1])
        self.class_names = embedded_labels(model)
        threshold = unknown_threshold(model, path) if unknown else None
        if unknown and (threshold is None or len(self._outputs) < 2):
            logger.warning(
                "%s has no unknown score (exported without a detector): its pictures are "
                "labelled, none can be called unknown.",
                path,
            )
            threshold = None
        self.unknown_threshold = threshold
        if threshold is None:
            self._outputs = self._outputs[:1]

    def predict(self, pixels):
        """float32 [n, size, size, 3] -> np.ndarray float32 [n, num_classes]."""
        return self.predict_scored(pixels)[0]

    def predict_scored(self, pixels):
        """float32 [n, size, size, 3] -> (float32 [n, num_classes], float32 [n] unknown scores
        or None without a detector)."""
        results = self._session.run(
            self._outputs, {self._input.name: np.asarray(pixels, np.float32)}
        )
        return results[0], (results[1] if len(results) > 1 else None)


def _signature(session, path):
    """(the input, [probabilities output name, score output name if any]) of a session;
    RetrainError unless they have the shapes `save_onnx` writes."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape if len(inputs) == 1 else []
    ranks = [len(output.shape) for output in outputs]
    if (
        len(shape) != 4
        or not all(isinstance(side, int) and side > 0 for side in shape[1:])
        or shape[1] != shape[2]
        or shape[3] != 3
        or ranks not in ([2], [2, 1])
        or not isinstance(outputs[0].shape[1], int)
        or "float" not in inputs[0].type
    ):
        raise RetrainError(
            f"{path} is not a classifier exported by retrain: it must take float32 pixels "
            f"[batch, size, size, 3] and give probabilities [batch, classes]. Received: graph={path}"
        )
    return inputs[0], [output.name for output in outputs]
