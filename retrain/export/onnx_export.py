"""The ONNX export (`--onnx`, OUTPUT_DIR/model.onnx): converted, checked, and run.

The file holds the fixed-size classifier the TFLite exports convert
(`retrain.export.unknown_graph.deployable`): input `pixels` float32
[batch, size, size, 3] RGB in [0, 255], already resized with
`retrain.data.resizing.resize_to_input` (the normalisation is inside), output
`probabilities` float32 [batch, classes] and, with an unknown detector,
`unknown_score` float32 [batch] (above the threshold: unknown). Its
`metadata_props` hold `labels` (a JSON list of the class names in output
order), `retrain_version` and, with the score, `unknown_threshold` (a number
as text).

Conversion is Keras's own `model.export(format="onnx")`, which runs tf2onnx
on the model's tf.function (ONNX opset `OPSET`). The converted bytes are run by
ONNX Runtime on a few of the run's images and compared with the Keras model
before anything is written (`check_agreement`): a file that disagrees by more
than `TOLERANCE` is never kept; the export fails with a RetrainError naming
the measured difference.

Loading (`PixelClassifier`, for `label_image --graph model.onnx`) reads the
file once, bounded, from a regular file, and refuses before ONNX Runtime
sees it: an operator or opset outside the standard ONNX domains (custom ops),
model-local functions, and any tensor kept in an external data file (which
could name a file anywhere; retrain's exports hold every weight inside). ONNX
Runtime then runs the checked bytes, not the path.

The packages are the optional extra [onnx]; `retrain.config.check_onnx_installed`
says how to install it.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np

from retrain.config import check_onnx_installed
from retrain.errors import RetrainError
from retrain.files import atomic_write, regular_file

logger = logging.getLogger(__name__)

# Largest |ONNX - Keras| allowed in any probability (and unknown score) of the check
# images. Measured on Lite0 exports with the test-time flip and the unknown score:
# at most 8.3e-7 on the check images, 4.5e-6 on the probabilities (6.6e-7 on the
# scores) of 300 held-out flowers128 photos (float32 rounding in other kernels); a
# corrupted or other network's file is off by 1e-2 or more.
TOLERANCE = 1e-4
# Images of the run the export is checked on (spread over the classes).
CHECK_IMAGES = 8
# ONNX opset 15: run by ONNX Runtime since 1.10 and by Windows ML; tf2onnx's default.
OPSET = 15
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


def save_onnx(
    fixed, class_names: list[str], path, pixels, detector=None, shown_as=None
) -> tuple[Path, float]:
    """Converts `fixed`, checks the result against it on `pixels`, writes `path` atomically.

    fixed: `unknown_graph.deployable(...)`, float32 [b, size, size, 3] -> probabilities
    (and the unknown score when `detector`, the UnknownDetector it computes, is given).
    pixels: float32 [n, size, size, 3], a few of the run's images (when none
    decodes, a fixed random batch stands in: the check compares two
    computations, any input shows a wrong graph). shown_as: the file's name
    in messages (default `path`; the final name of a file staged elsewhere).

    Returns (path, the largest difference measured). Raises RetrainError when
    the conversion fails, when ONNX Runtime's outputs differ from Keras's by
    more than TOLERANCE (nothing is written then), or when the file cannot be written.
    """
    if (detector is not None) != (len(fixed.outputs) == 2):
        raise ValueError("detector must be given exactly for a model with the score output")
    shown_as = path if shown_as is None else shown_as
    model = convert(fixed, shown_as)
    metadata = {LABELS_KEY: json.dumps(list(class_names)), VERSION_KEY: _retrain_version()}
    if detector is not None:
        metadata[THRESHOLD_KEY] = repr(float(detector.threshold))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    content = model.SerializeToString()
    if len(pixels) == 0:
        shape = (2, *fixed.inputs[0].shape[1:])
        pixels = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    difference = check_agreement(fixed, content, pixels, shown_as)
    try:
        return atomic_write.write_bytes(path, content), difference
    except OSError as error:
        raise RetrainError(f"Cannot write {shown_as}: {error.strerror or error}.") from None


def convert(fixed, path):
    """onnx.ModelProto of the Keras model `fixed`, input INPUT, outputs PROBABILITIES (and
    SCORE), the batch dimension named "batch". RetrainError naming `path` if it fails."""
    import warnings

    import onnx
    import tensorflow as tf

    from retrain.quiet_tensorflow import captured_output

    size = int(fixed.inputs[0].shape[1])
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT)]
    with tempfile.TemporaryDirectory(prefix="retrain-onnx-") as folder:
        target = Path(folder) / "model.onnx"
        # tf2onnx logs its steps and Grappler its sessions on fds 1 and 2.
        with captured_output(1, 2) as captured, warnings.catch_warnings():
            # Keras's numpy-2 patch of tf2onnx probes np.object, which warns.
            warnings.simplefilter("ignore", FutureWarning)
            try:
                fixed.export(
                    str(target),
                    format="onnx",
                    verbose=False,
                    input_signature=signature,
                    opset_version=OPSET,
                )
                model = onnx.load(str(target))
            except Exception as error:  # noqa: BLE001 - tf2onnx raises many types
                lines = [line for line in captured().splitlines() if "rror" in line]
                detail = lines[-1] if lines else (str(error).splitlines() or [""])[0]
                raise RetrainError(
                    f"Cannot convert the model to ONNX for {path}: {type(error).__name__}: "
                    f"{detail}. Run without --onnx, or report this with your TensorFlow and "
                    f"tf2onnx versions."
                ) from None
    _name_outputs(model.graph, [PROBABILITIES, SCORE][: len(fixed.outputs)])
    return model


def _name_outputs(graph, names: list[str]) -> None:
    """Renames the graph's outputs (tf2onnx's "Identity:0", ...) to `names`, in order, and
    every dimension tf2onnx left unnamed (the batch) to "batch"."""
    renamed = {output.name: name for output, name in zip(graph.output, names)}
    for node in graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
        node.input[:] = [renamed.get(name, name) for name in node.input]
    for value in [*graph.input, *graph.output]:
        value.name = renamed.get(value.name, value.name)
        for dimension in value.type.tensor_type.shape.dim:
            if dimension.HasField("dim_param"):
                dimension.dim_param = "batch"


def _retrain_version() -> str:
    import retrain

    return str(retrain.__version__)


def check_agreement(fixed, content: bytes, pixels, path, tolerance: float = TOLERANCE) -> float:
    """The largest |ONNX Runtime - Keras| over every output of `pixels`; RetrainError when it
    exceeds `tolerance`.

    fixed: the Keras model `content` (ONNX bytes) was converted from; pixels:
    float32 [n, size, size, 3]; path: the file's name, for the message.
    """
    pixels = np.asarray(pixels, np.float32)
    expected = fixed.predict_on_batch(pixels)
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    try:
        actual = _session(content).run(None, {INPUT: pixels})
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types
        raise RetrainError(
            f"ONNX Runtime cannot run the exported {path}: {str(error).splitlines()[0]}. "
            f"Nothing was written; run without --onnx."
        ) from None
    difference = max(
        (
            float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))))
            if np.shape(a) == np.shape(e)
            else math.inf
        )
        for a, e in zip(actual, expected)
    )
    if len(actual) != len(expected) or not difference <= tolerance:
        raise RetrainError(
            f"The ONNX export {path} does not match the Keras model: the largest difference "
            f"of its outputs on {len(pixels)} of the run's images is {difference:.3g}, above "
            f"the tolerance {tolerance:g}. The file was not written; run without --onnx."
        )
    return difference


def _session(content: bytes):
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
            self._session = _session(content)
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
