"""The ONNX export (`--onnx`, OUTPUT_DIR/model.onnx): converted and checked.

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

What the file holds, and how it is read and run: `retrain.export.onnx_file`.

The packages are the optional extra [onnx]; `retrain.extras.check_onnx_installed`
says how to install it.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np

from retrain.errors import RetrainError
from retrain.export.onnx_file import (
    INPUT,
    LABELS_KEY,
    PROBABILITIES,
    SCORE,
    THRESHOLD_KEY,
    VERSION_KEY,
    session,
)
from retrain.files import atomic_write

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
        actual = session(content).run(None, {INPUT: pixels})
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
