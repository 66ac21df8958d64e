"""A backbone's LiteRT conversions (float32, int8), made once, checked against Keras, remembered.

The converted file is kept under ``$RETRAIN_HOME/backbones`` beside the
converted weights, named after the backbone fingerprint, the batch size and
the TensorFlow version that converted it, with a JSON record of its sha256 and
of the check it passed: at conversion, its vectors are compared with the
Keras forward pass on real photos (scikit-image's, else the caller's first
batch) and the file is kept only if every vector is within ``TOLERANCE``
(the int8 conversion: cosine similarities, `retrain.engines.int8.check`). A
failed check is recorded too, so ``engines.resolve`` goes straight to Keras
on later runs.
"""

import contextlib
import hashlib
import json
import logging

import numpy as np

from retrain import backbones
from retrain.backbones import conversion_cache
from retrain.engines import int8, litert
from retrain.engines.keras_engine import KerasEngine
from retrain.errors import RetrainError
from retrain.files import atomic_write
from retrain.quiet_tensorflow import import_tensorflow

logger = logging.getLogger(__name__)

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


class EngineCheckFailed(RetrainError):
    """The LiteRT conversion does not reproduce the Keras vectors."""


def converted_engine(spec, weights_file=None, model=None, check_paths=(), name="litert"):
    """The LiteRT engine ``name`` ("litert" or "litert-int8") of backbone ``spec``, converted
    and checked when not kept yet.

    ``model``: the Keras backbone if the caller has it (built here only to
    convert). ``check_paths``: image files to check a new conversion on.
    Raises EngineCheckFailed (after recording it) when a new conversion fails
    or does not reproduce the Keras vectors.
    """
    path = litert_path(spec.name, weights_file, name)
    record = read_record(path)
    if record and record.get("passed") and _file_sha256(path) == record.get("sha256"):
        return _engine(path, name)
    if record and record.get("passed"):
        logger.warning("converting %s again: %s does not match its record", spec.name, path)
    if model is None:
        model = backbones.load(spec.name, include_top=False, weights_file=weights_file)
    logger.warning(
        "converting %s to %s once (%s); it is kept in %s",
        spec.name,
        "int8 LiteRT" if name == int8.ENGINE else "LiteRT",
        "about a minute" if name == int8.ENGINE else "about half a minute",
        path.parent,
    )
    engine, record = _convert_and_check(model, spec.input_size, path, check_paths, name)
    _write_record(path, record)
    if not record["passed"]:
        raise EngineCheckFailed(
            f"The {name} conversion of {spec.name} does not reproduce the Keras "
            f"vectors: {record['reason']}. Received: engine={name}"
        )
    return engine


def _engine(path, name):
    return litert.LiteRTEngine(path, name=name)


def _convert_and_check(model, input_size, path, check_paths, name="litert"):
    """Writes the conversion to ``path`` and compares it with Keras: (engine, record).

    A file that fails is deleted; the record says why.
    """
    engine, measured = None, {}
    try:
        if name == int8.ENGINE:
            converted = int8.convert(model, input_size, LITERT_BATCH)
        else:
            converted = litert.convert_backbone(model, input_size, LITERT_BATCH)
        atomic_write.write_bytes(path, converted)
        engine = _engine(path, name)
        pixels = check_pixels(input_size, check_paths)
        keras_engine = KerasEngine(model, input_size)
        if name == int8.ENGINE:
            measured, reason = int8.check(keras_engine(pixels), engine(pixels))
        else:
            measured, reason = _float_check(compare(keras_engine, engine, pixels), len(pixels))
    except Exception as error:  # noqa: BLE001 - the converter raises many types
        reason = f"conversion failed ({type(error).__name__}: {error})"
    record = {"sha256": _file_sha256(path), **measured, "passed": reason is None}
    if not record["passed"]:
        record["reason"] = reason
        path.unlink(missing_ok=True)
    return engine, record


def _float_check(deviation, photos):
    """({"max_relative_deviation", "tolerance"}, None or why the float conversion failed)."""
    measured = {"max_relative_deviation": deviation, "tolerance": TOLERANCE}
    if deviation <= TOLERANCE:
        return measured, None
    return measured, f"max relative deviation {deviation:.2e} > {TOLERANCE:.0e} on {photos} photos"


def _write_record(path, record):
    try:
        atomic_write.write_bytes(record_path(path), json.dumps(record, indent=1).encode())
    except OSError as error:
        logger.warning(
            "cannot record the LiteRT conversion in %s (%s); set RETRAIN_HOME to a writable folder",
            path.parent,
            error.strerror or error,
        )


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
    from retrain.data import decode, resizing

    images = []
    for path in paths:
        with contextlib.suppress(decode.ImageDecodeError):
            images.append(decode.decode_rgb(path, input_size))
    with contextlib.suppress(ImportError):
        from skimage import data

        images += [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    if not images:
        raise RetrainError(
            "No photo to check the LiteRT conversion on: none of "
            f"{len(paths)} images decoded and scikit-image is not installed."
        )
    return np.stack([resizing.resize_to_input(image, input_size) for image in images])


def litert_path(backbone_name, weights_file=None, name="litert"):
    """Where the conversion ``name`` ("litert" or "litert-int8") of this backbone (and
    weights) is kept: a Path. The int8 file's name carries the calibration version."""
    tf = import_tensorflow()  # for its version: the converter is TensorFlow's
    fingerprint = backbones.fingerprint(backbone_name, weights_file)
    kind = f"-int8c{int8.CALIBRATION_VERSION}" if name == int8.ENGINE else ""
    return (
        conversion_cache.retrain_home()
        / "backbones"
        / f"{backbone_name}-{fingerprint[:16]}-b{LITERT_BATCH}-tf{tf.__version__}{kind}"
        f"-v{_FORMAT_VERSION}.tflite"
    )


def record_path(path):
    """The JSON record beside a converted file."""
    return path.with_name(path.name + ".json")


def read_record(path):
    """The record of the conversion at ``path`` (dict), or None when there is none."""
    try:
        return json.loads(record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _file_sha256(path):
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
