"""The .keras model's unknown detector: a sidecar HDF5 file beside the model.

``model.keras`` keeps its one probabilities output; ``model.unknown.h5``
beside it holds what the unknown score needs (retrain.evaluation.unknown):
the reference vectors (float16 [n, d], unit rows) as the one dataset, and
the attributes k, threshold, acceptance, method, format_version and
model_sha256, the SHA-256 of the model file it was fitted with. A sidecar
of another model file (the model was replaced, or copied without it) is
ignored with a warning, so a picture is never judged against the wrong
vectors; a model without a sidecar labels as before.

The file is data only and read as untrusted: a regular file of bounded
size, HDF5 with one plain dataset (no links to other files, no filters, no
variable-length or object types) of bounded shape, checked from metadata
before any of it is read. Anything else is a RetrainError naming the file.
No TensorFlow.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path

import h5py
import numpy as np

from retrain.cache import hdf5_checks
from retrain.cache.journal import UnreadableCache
from retrain.errors import RetrainError
from retrain.evaluation import unknown
from retrain.files import atomic_write, regular_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METHOD = unknown.METHOD
SUFFIX = ".unknown.h5"
# Bounds checked from metadata before the reference is read: at most this
# many rows of at most this many floats (2 GiB of float16 at the extreme).
MAX_ROWS = 65536
MAX_DIMENSION = 16384
MAX_FILE_BYTES = MAX_ROWS * MAX_DIMENSION * 2 + (1 << 20)
_TEXT_ATTRIBUTES = {"method": 64, "model_sha256": 64}  # fixed-length bytes, at most this long
_NUMBER_ATTRIBUTES = ("k", "threshold", "acceptance", "format_version")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Malformed(Exception):
    """What is wrong with a sidecar file (becomes a RetrainError naming it)."""


def unknown_path(model_path) -> Path:
    """The sidecar of a model file: ``out/model.keras`` -> ``out/model.unknown.h5``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + SUFFIX)


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with regular_file.open_regular(path, follow_symlinks=True, limit=None) as (file, _):
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(detector: unknown.UnknownDetector, path, model_file) -> Path:
    """Writes `detector` to `path` atomically, bound to the model file `model_file` (which
    must already be written: its SHA-256 is recorded). Returns `path`."""
    path = Path(path)
    reference = np.asarray(detector.reference, dtype=np.float16)
    if reference.ndim != 2 or not 0 < len(reference) <= MAX_ROWS:
        raise ValueError(f"reference must be [1..{MAX_ROWS}, d], not of shape {reference.shape}")
    digest = file_sha256(model_file)
    with atomic_write.atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as file:
            file.create_dataset("reference", data=reference)
            file.attrs["k"] = np.int64(detector.k)
            file.attrs["threshold"] = np.float64(detector.threshold)
            file.attrs["acceptance"] = np.float64(detector.acceptance)
            file.attrs["format_version"] = np.int64(FORMAT_VERSION)
            file.attrs["method"] = np.bytes_(METHOD)
            file.attrs["model_sha256"] = np.bytes_(digest)
    return path


def load(path, model_file) -> unknown.UnknownDetector | None:
    """The detector stored at `path` for the model file `model_file`.

    None, with one warning, when there is no file or it belongs to another
    model file; RetrainError (one line naming the file) when it cannot be read.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        logger.warning(
            "%s has no unknown detector (%s is missing; models exported before unknown "
            "detection have none): labelling without calling pictures unknown.",
            model_file,
            path.name,
        )
        return None
    try:
        with regular_file.open_regular(path, follow_symlinks=False, limit=MAX_FILE_BYTES) as (
            handle,
            status,
        ):
            recorded, detector = _read(handle, status.st_size, path)
    except (_Malformed, UnreadableCache) as error:
        raise _unreadable(path, error) from None
    except OSError as error:  # not HDF5, truncated, a FIFO, a link, too large
        raise _unreadable(path, error.strerror or error) from None
    if recorded != file_sha256(model_file):
        logger.warning(
            "%s belongs to another model file than %s (the model was replaced or copied "
            "without it): labelling without calling pictures unknown; retrain to rebuild it.",
            path,
            model_file,
        )
        return None
    return detector


def _unreadable(path, reason) -> RetrainError:
    reason = " ".join(str(reason).split())
    return RetrainError(
        f"The unknown detector file {path} cannot be read ({reason}); delete it to label "
        "without unknown detection, or retrain to write it again."
    )


def _read(handle, file_size: int, path) -> tuple[str, unknown.UnknownDetector]:
    """(recorded model SHA-256, detector) of an open sidecar file, checked before reading."""
    try:
        file = h5py.File(handle, "r")
    except OSError:
        raise _Malformed("it is not an HDF5 file, or it is truncated") from None
    with file:
        attributes = _attributes(file)
        datasets = hdf5_checks.check_datasets(file, {"reference": (np.float16, 2)}, file_size, path)
        rows, dimension = datasets["reference"].shape
        if not (0 < rows <= MAX_ROWS and 0 < dimension <= MAX_DIMENSION):
            raise _Malformed(
                f"reference has shape {(rows, dimension)}, beyond [1..{MAX_ROWS}, 1..{MAX_DIMENSION}]"
            )
        if not 1 <= attributes["k"] <= rows:
            raise _Malformed(f"k={attributes['k']} is not between 1 and its {rows} reference rows")
        reference = datasets["reference"][()].astype(np.float32)
    if not np.isfinite(reference).all():
        raise _Malformed("reference holds values that are not finite")
    detector = unknown.UnknownDetector(
        reference=unknown.unit_rows(reference),
        k=attributes["k"],
        threshold=attributes["threshold"],
        acceptance=attributes["acceptance"],
    )
    return attributes["model_sha256"], detector


def _attributes(file) -> dict:
    """The root attributes, each checked to be a scalar of the expected kind before reading."""
    hdf5_checks.check_attributes(file, (*_NUMBER_ATTRIBUTES, *_TEXT_ATTRIBUTES))
    values = {}
    for name in (*_NUMBER_ATTRIBUTES, *_TEXT_ATTRIBUTES):
        if name not in file.attrs:
            raise _Malformed(f"attribute {name!r} is missing")
        dtype = file.attrs.get_id(name).dtype
        if name in _TEXT_ATTRIBUTES:
            if dtype.kind != "S" or dtype.itemsize > _TEXT_ATTRIBUTES[name]:
                raise _Malformed(f"attribute {name!r} holds {dtype}, not short fixed-length text")
            values[name] = file.attrs[name].decode("ascii", "replace")
        elif dtype.kind not in "iuf":
            raise _Malformed(f"attribute {name!r} holds {dtype}, not a number")
        else:
            values[name] = file.attrs[name].item()
    if values["format_version"] != FORMAT_VERSION or values["method"] != METHOD:
        raise _Malformed(
            f"it is format {values['format_version']} of method {values['method']!r}; this "
            f"retrain reads format {FORMAT_VERSION} of {METHOD!r}"
        )
    if not _SHA256.fullmatch(values["model_sha256"]):
        raise _Malformed("attribute 'model_sha256' is not a SHA-256 digest")
    if not (math.isfinite(values["threshold"]) and 0 < values["acceptance"] <= 1):
        raise _Malformed(
            f"threshold={values['threshold']} or acceptance={values['acceptance']} is out of range"
        )
    if values["k"] != int(values["k"]):
        raise _Malformed(f"k={values['k']} is not a whole number")
    values["k"] = int(values["k"])
    return values
