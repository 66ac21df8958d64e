"""LiteRT: the one Keras -> ``.tflite`` converter and the one interpreter set-up.

The backbone engine (``LiteRTEngine``) and the TFLite exports
(``retrain.export.tflite``) both convert with ``convert`` and open files with
``open_interpreter``, so they silence the same chatter and use the same
runtime: ai-edge-litert's interpreter (XNNPACK) when it is installed, else
TensorFlow's deprecated ``tf.lite.Interpreter``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from retrain.config import TFLITE_KINDS
from retrain.engines.keras_engine import in_fixed_batches
from retrain.errors import RetrainError
from retrain.quiet_tensorflow import captured_output, import_tensorflow


def runtime_available():
    """True when ai-edge-litert's interpreter can be imported."""
    try:
        from ai_edge_litert import interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_class():
    """LiteRT's Interpreter when ai-edge-litert is installed, else TensorFlow's (deprecated) one."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = import_tensorflow().lite.Interpreter
    return Interpreter


def open_interpreter(path, num_threads=None):
    """An interpreter of the ``.tflite`` file ``path`` with its tensors allocated.

    ``num_threads``: default all cores. Raises what the interpreter raises
    (ValueError, RuntimeError) for a file it cannot load.
    """
    # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." comes on fd 2.
    with captured_output(2):
        interpreter = interpreter_class()(
            model_path=str(path), num_threads=num_threads or os.cpu_count() or 1
        )
        interpreter.allocate_tensors()
    return interpreter


def convert(fixed, kind="float32", calibration=None, float_ops=()) -> bytes:
    """The TFLite flatbuffer (bytes) of a fixed-shape Keras model for one kind.

    ``from_keras_model`` freezes the weights into constants (about 13 MB for
    Lite0); converting a tf.function that captures the variables instead keeps
    them as resource variables and runs several times slower.

    Args:
      fixed: a keras.Model whose input shape is fully known except perhaps the batch.
      kind: "float32" (weights as they are), "float16" (weights stored as
        float16, computed in float32) or "int8" (weights and activations
        int8; input and output stay float32).
      calibration: for int8, float32 [n, size, size, 3] RGB in [0, 255]
        (resized training images; a few hundred are plenty).
      float_ops: for int8, TFLite builtin op names (e.g. "TOPK_V2") left in
        float32 (selective quantization, TensorFlow's QuantizationDebugger):
        for ops whose values on new pictures fall outside the calibration
        images' ranges (the unknown score, see retrain.export.unknown_graph).

    Raises RetrainError naming the converter's last error line.
    """
    tf = import_tensorflow()
    if kind not in TFLITE_KINDS:
        raise RetrainError(
            f"Unknown TFLite kind; expected one of {', '.join(TFLITE_KINDS)}. "
            f"Received: kind={kind!r}"
        )
    converter = tf.lite.TFLiteConverter.from_keras_model(fixed)
    if kind != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if kind == "int8":
        if calibration is None or len(calibration) == 0:
            raise RetrainError("int8 conversion needs calibration images. Received: none")
        # One image per sample, or the model's fixed batch of them (a backbone
        # converted at a fixed batch, see retrain.engines.int8).
        step = fixed.inputs[0].shape[0] or 1
        converter.representative_dataset = lambda: (
            [calibration[start : start + step]]
            for start in range(0, len(calibration) - step + 1, step)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # The converter prints Keras's export log and MLIR's quantizer lines on fds 1 and 2.
    with captured_output(1, 2) as captured, warnings.catch_warnings():
        # "Statistics for quantized inputs were expected": our inputs stay float32 by design.
        warnings.simplefilter("ignore", UserWarning)
        try:
            if kind == "int8" and float_ops:
                return _selectively_quantized(tf, converter, float_ops)
            return converter.convert()
        except Exception as error:  # noqa: BLE001  (the converter raises many types)
            lines = [line for line in captured().splitlines() if "rror" in line]
            detail = lines[-1] if lines else str(error).splitlines()[0]
            raise RetrainError(f"TFLite {kind} conversion failed: {detail}") from None


def _selectively_quantized(tf, converter, float_ops) -> bytes:
    """The int8 model of `converter` (set up for int8) with the ops `float_ops` kept float32."""
    # Float fallback allowed: the denylisted ops have no int8 kernels to call.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=converter.representative_dataset,
        debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops)),
    )
    return bytes(debugger.get_nondebug_quantized_model())


def convert_backbone(model, input_size, batch_size):
    """The float32 ``.tflite`` (bytes) of a Keras backbone at a fixed batch size.

    The interpreter then runs float32 [batch_size, input_size, input_size, 3]
    -> [batch_size, feature_dim].
    """
    import keras

    pixels = keras.Input((input_size, input_size, 3), batch_size=batch_size)
    return convert(keras.Model(pixels, model(pixels, training=False)))


class LiteRTEngine:
    """A converted ``.tflite`` backbone on the LiteRT interpreter (XNNPACK).

    ``path``: the flatbuffer, float32 [batch_size, size, size, 3] ->
    [batch_size, feature_dim]. Calls of other sizes are cut into chunks of
    ``batch_size`` (the last one zero-padded), so any batch works.
    """

    name = "litert"

    def __init__(self, path, num_threads=None, name="litert"):
        self.name = name  # "litert-int8" for a full-integer file (retrain.engines.int8)
        self.path = path
        self._interpreter = open_interpreter(path, num_threads)
        source = self._interpreter.get_input_details()[0]
        target = self._interpreter.get_output_details()[0]
        self.batch_size, self.input_size = int(source["shape"][0]), int(source["shape"][1])
        self.feature_dim = int(target["shape"][-1])
        self._input, self._output = source["index"], target["index"]

    def __call__(self, pixels):
        """float32 or uint8 [b, size, size, 3] in [0, 255] -> float32 np.ndarray [b, feature_dim]."""
        return in_fixed_batches(self._invoke, pixels, self.batch_size, self.feature_dim)

    def _invoke(self, chunk):
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(chunk))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)
