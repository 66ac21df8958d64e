"""Inference engines: one interface, ``vectors = engine(pixels)``, two runtimes.

* ``KerasEngine``, the reference: the Keras backbone as a traced
  ``tf.function`` (any batch size; TensorFlow uses a GPU when it has one).
* ``LiteRTEngine``: the same backbone converted once with
  ``tf.lite.TFLiteConverter.from_keras_model`` at a fixed batch size into a
  flatbuffer with the weights frozen in, run by ai-edge-litert's interpreter
  with XNNPACK. On a 2-core CPU it is 1.3-3x faster than the Keras graph.

The converted file is kept under ``$RETRAIN_HOME/backbones`` beside the
converted weights, named after the backbone fingerprint, the batch size and
the TensorFlow version that converted it, with a JSON record of its sha256 and
of the check it passed: at conversion, its vectors are compared with the
Keras forward pass on real photos (scikit-image's, else the caller's first
batch) and the file is kept only if every vector is within ``TOLERANCE``.
When the check fails or the runtime is missing, ``build`` warns and returns
the Keras engine; ``resolve`` remembers a failed check, so later runs go
straight to Keras.

Every engine takes float32 [batch, input_size, input_size, 3] RGB values in
[0, 255] (numpy or tf.Tensor) and returns float32 np.ndarray [batch,
feature_dim]. Engines give slightly different vectors, so the engine's name is
part of the bottleneck cache's identity.
"""

import contextlib
import hashlib
import io
import json
import logging
import os

import numpy as np

from retrain.files import atomic_write
from retrain import backbones
from retrain.backbones import conversion_cache
from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow

logger = logging.getLogger(__name__)

ENGINES = ("auto", "keras", "litert")
# The interpreter's fixed batch. On 2 cores, batch 4 gave the most images/s
# (medians of 5, interleaved, 64 photos: 305 against 292 at batch 8, 299 at
# 1; another run 255 against 237). Batches 1, 2, 4 and 8 gave bit-identical
# vectors, and a vector does not depend on the images beside it in a call
# (tested), so the batch is not part of the cache's identity.
LITERT_BATCH = 4
# Largest allowed |litert - keras| of any bottleneck element, relative to the
# largest element of that image's Keras vector. Measured on photos: 6e-6
# (float32 rounding in other kernels); float16 storage alone rounds at 5e-4,
# so 1e-3 catches a wrong conversion, never rounding noise.
TOLERANCE = 1e-3
_FORMAT_VERSION = 1


def runtime_available():
    """True when ai-edge-litert's interpreter can be imported."""
    try:
        from ai_edge_litert import interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_available():
    """True when TensorFlow sees a GPU (it then runs the Keras engine there)."""
    tf = import_tensorflow()
    return bool(tf.config.list_physical_devices("GPU"))


def resolve(requested, backbone_name, weights_file=None):
    """The engine a run uses, "keras" or "litert", decided without building it.

    ``auto`` means Keras when TensorFlow has a GPU, else LiteRT when its
    runtime is installed and its conversion of this backbone has not failed
    its check before, else Keras. An explicit ``litert`` falls back the same
    way, with a warning.
    """
    if requested not in ENGINES:
        raise RetrainError(
            f"engine must be one of {', '.join(ENGINES)}. Received: engine={requested!r}"
        )
    if requested == "keras" or (requested == "auto" and gpu_available()):
        return "keras"
    if not runtime_available():
        _fall_back(requested, "the ai-edge-litert runtime is not installed")
        return "keras"
    path = _litert_path(backbone_name, weights_file)
    record = _read_record(path)
    if record is not None and not record.get("passed"):
        _fall_back(requested, f"its conversion failed the check against Keras "
                              f"({record.get('reason')}); delete {_record_path(path)} "
                              "to convert again")
        return "keras"
    return "litert"


def _fall_back(requested, why):
    if requested == "litert":
        logger.warning("using the Keras engine instead of LiteRT: %s", why)


class EngineCheckFailed(RetrainError):
    """The LiteRT conversion does not reproduce the Keras vectors."""


class KerasEngine:
    """The Keras backbone as one traced graph function of a fixed batch.

    Calls of other sizes are cut into chunks of ``batch_size``, the last one
    zero-padded: on CPU some batch sizes (1 and 3 here) round differently in
    the last bits, and an image's vector must not depend on how many images
    were extracted with it (a sharded build equals a single-process one bit
    for bit).
    """

    name = "keras"

    def __init__(self, model, input_size, batch_size=32):
        tf = import_tensorflow()
        self.model = model
        self.input_size = input_size
        self.batch_size = batch_size
        self.feature_dim = model.output_shape[-1]
        self._forward = tf.function(
            lambda pixels: model(pixels, training=False),
            input_signature=[tf.TensorSpec([batch_size, input_size, input_size, 3], tf.float32)],
        )

    def __call__(self, pixels):
        """float32 [b, size, size, 3] in [0, 255] -> float32 np.ndarray [b, feature_dim]."""
        return _in_fixed_batches(self._forward, pixels, self.batch_size, self.feature_dim)


class LiteRTEngine:
    """A converted ``.tflite`` backbone on the LiteRT interpreter (XNNPACK).

    ``path``: the flatbuffer, float32 [batch_size, size, size, 3] ->
    [batch_size, feature_dim]. Calls of other sizes are cut into chunks of
    ``batch_size`` (the last one zero-padded), so any batch works.
    """

    name = "litert"

    def __init__(self, path, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = path
        with _quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate"
            self._interpreter = Interpreter(
                model_path=str(path), num_threads=num_threads or os.cpu_count() or 1
            )
            self._interpreter.allocate_tensors()
        source = self._interpreter.get_input_details()[0]
        target = self._interpreter.get_output_details()[0]
        self.batch_size, self.input_size = int(source["shape"][0]), int(source["shape"][1])
        self.feature_dim = int(target["shape"][-1])
        self._input, self._output = source["index"], target["index"]

    def __call__(self, pixels):
        """float32 [b, size, size, 3] in [0, 255] -> float32 np.ndarray [b, feature_dim]."""
        return _in_fixed_batches(self._invoke, pixels, self.batch_size, self.feature_dim)

    def _invoke(self, chunk):
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(chunk))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)


def _in_fixed_batches(forward, pixels, batch_size, feature_dim):
    """Runs ``forward`` (a fixed-batch function) over any number of images.

    pixels: float32 [b, size, size, 3]; returns float32 np.ndarray [b, feature_dim].
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    count = len(pixels)
    vectors = np.empty((count, feature_dim), np.float32)
    for start in range(0, count, batch_size):
        chunk = pixels[start : start + batch_size]
        if len(chunk) < batch_size:
            padding = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], np.float32)
            chunk = np.concatenate([chunk, padding])
        vectors[start : start + batch_size] = np.asarray(forward(chunk))[: count - start]
    return vectors


def build(name, backbone_name, weights_file=None, model=None, check_paths=()):
    """The engine ``name`` ("keras" or "litert", see ``resolve``) for a backbone.

    ``model``: the Keras backbone if the caller has it (else it is built when
    needed: always for Keras, for LiteRT only to convert). ``check_paths``:
    image files to check a new conversion on (the run's own photos), used
    with scikit-image's sample photos when that package is installed.
    Raises EngineCheckFailed when a new LiteRT conversion fails or does not
    reproduce the Keras vectors; the failure is recorded, so ``resolve``
    chooses Keras from then on.
    """
    spec = backbones.get(backbone_name)
    if name == "keras":
        if model is None:
            model = backbones.load(spec.name, include_top=False, weights_file=weights_file)
        return KerasEngine(model, spec.input_size)
    if name != "litert":
        raise RetrainError(f"engine must be keras or litert. Received: name={name!r}")
    path = _litert_path(spec.name, weights_file)
    record = _read_record(path)
    if record and record.get("passed") and _file_sha256(path) == record.get("sha256"):
        return LiteRTEngine(path)
    if record and record.get("passed"):
        logger.warning("converting %s again: %s does not match its record", spec.name, path)
    if model is None:
        model = backbones.load(spec.name, include_top=False, weights_file=weights_file)
    logger.warning("converting %s to LiteRT once (about half a minute); it is kept in %s",
                   spec.name, path.parent)
    try:
        atomic_write.write_bytes(path, convert(model, spec.input_size, LITERT_BATCH))
        engine = LiteRTEngine(path)
        pixels = check_pixels(spec.input_size, check_paths)
        deviation = compare(KerasEngine(model, spec.input_size), engine, pixels)
    except Exception as error:  # noqa: BLE001 - the converter raises many types
        deviation, reason = None, f"conversion failed ({type(error).__name__}: {error})"
    else:
        reason = f"max relative deviation {deviation:.2e} > {TOLERANCE:.0e} on {len(pixels)} photos"
    record = {"sha256": _file_sha256(path), "max_relative_deviation": deviation,
              "tolerance": TOLERANCE, "passed": deviation is not None and deviation <= TOLERANCE}
    if not record["passed"]:
        record["reason"] = reason
    if not record["passed"]:
        path.unlink(missing_ok=True)
    try:
        atomic_write.write_bytes(_record_path(path), json.dumps(record, indent=1).encode())
    except OSError as error:
        logger.warning("cannot record the LiteRT conversion in %s (%s); set RETRAIN_HOME "
                       "to a writable folder", path.parent, error.strerror or error)
    if not record["passed"]:
        raise EngineCheckFailed(
            f"The LiteRT conversion of {spec.name} does not reproduce the Keras "
            f"vectors: {reason}. Received: engine=litert"
        )
    return engine


def convert(model, input_size, batch_size):
    """The ``.tflite`` flatbuffer (bytes) of a Keras model at a fixed batch size.

    ``from_keras_model`` freezes the weights into constants (about 13 MB for
    Lite0); converting a tf.function that captures the variables instead keeps
    them as resource variables and runs several times slower.
    """
    import keras

    tf = import_tensorflow()
    pixels = keras.Input((input_size, input_size, 3), batch_size=batch_size)
    fixed = keras.Model(pixels, model(pixels, training=False))
    converter = tf.lite.TFLiteConverter.from_keras_model(fixed)
    # The converter prints the saved signature to stdout; results go there.
    with contextlib.redirect_stdout(io.StringIO()), _quiet_stderr():
        return converter.convert()


def compare(reference, engine, pixels):
    """Max over images of max |engine - reference| / max |reference| (float)."""
    expected, found = reference(pixels), engine(pixels)
    scale = np.maximum(np.abs(expected).max(axis=1), 1e-6)
    return float((np.abs(found - expected).max(axis=1) / scale).max())


def check_pixels(input_size, paths=()):
    """Real photos for the conversion check: float32 [n, size, size, 3] in [0, 255].

    The images of ``paths`` that decode (as extraction decodes them) and
    scikit-image's sample photos (chelsea, coffee, astronaut, rocket) when it
    is installed. Raises RetrainError when there is no photo at all.
    """
    from retrain.data import decode

    images = []
    for path in paths:
        with contextlib.suppress(decode.ImageDecodeError):
            images.append(decode.decode_rgb(path, input_size))
    with contextlib.suppress(ImportError):
        from skimage import data

        images += [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    if not images:
        raise RetrainError("No photo to check the LiteRT conversion on: none of "
                           f"{len(paths)} images decoded and scikit-image is not installed.")
    return np.stack([decode.resize_to_input(image, input_size) for image in images])


def _litert_path(backbone_name, weights_file=None):
    tf = import_tensorflow()  # for its version: the converter is TensorFlow's
    fingerprint = backbones.fingerprint(backbone_name, weights_file)
    return (conversion_cache.retrain_home() / "backbones" /
            f"{backbone_name}-{fingerprint[:16]}-b{LITERT_BATCH}-tf{tf.__version__}"
            f"-v{_FORMAT_VERSION}.tflite")


def _record_path(path):
    return path.with_name(path.name + ".json")


def _read_record(path):
    try:
        return json.loads(_record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _file_sha256(path):
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@contextlib.contextmanager
def _quiet_stderr():
    """Silences C++ log lines written straight to file descriptor 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
