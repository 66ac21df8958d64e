"""Converted backbone weights, cached under $RETRAIN_HOME.

Converting a PyTorch state dict to Keras layouts is done once per source file:
the result is stored as an uncompressed `.npz` named after the backbone and
the source file's sha256, with a digest of its own arrays inside. A cache file
that cannot be read or whose digest does not match is rebuilt with a warning;
a cache that cannot be written only costs the next run a conversion.
"""

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from retrain.files import atomic_write

logger = logging.getLogger(__name__)

# Bump when the layout of the converted arrays changes, so old files are not read.
FORMAT_VERSION = 1
_DIGEST_KEY = "__digest__"


def retrain_home():
    """The folder for retrain's caches: $RETRAIN_HOME, else ~/.cache/retrain."""
    return Path(os.environ.get("RETRAIN_HOME") or "~/.cache/retrain").expanduser()


def cache_path(name, source_sha256):
    """Where the converted weights of `name` from the source with this sha256 live."""
    return retrain_home() / "backbones" / f"{name}-{source_sha256}-v{FORMAT_VERSION}.npz"


def load_or_convert(name, source_sha256, convert):
    """Return the converted arrays, from the cache or by calling `convert()`.

    Args:
        name: backbone name, used in the file name.
        source_sha256: hex sha256 of the file `convert` reads.
        convert: callable returning dict[str, np.ndarray] (Keras variable
            path -> array); called only when the cache is missing or invalid.

    Returns:
        dict[str, np.ndarray], the arrays as `convert` returned them.
    """
    path = cache_path(name, source_sha256)
    if path.exists():
        try:
            return _read(path)
        except Exception as error:  # any unreadable cache is rebuilt
            logger.warning(
                "Rebuilding the converted weights cache %s, which cannot be used: %s",
                path,
                error,
            )
    arrays = convert()
    try:
        _write(path, arrays)
    except OSError as error:
        logger.warning(
            "Cannot write the converted weights cache %s (%s); the next run "
            "will convert the weights again. Set RETRAIN_HOME to a writable "
            "folder to avoid this.",
            path,
            error,
        )
    return arrays


def _digest(arrays):
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _read(path):
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    recorded = str(arrays.pop(_DIGEST_KEY, ""))
    if recorded != _digest(arrays):
        raise ValueError("its contents do not match the digest recorded in it")
    return arrays


def _write(path, arrays):
    """Write atomically: readers see the old file or the complete new one."""
    with atomic_write.atomic_path(path) as temporary:
        np.savez(temporary, **arrays, **{_DIGEST_KEY: np.array(_digest(arrays))})
