"""Digests: the one way retrain names a set of values by a hash.

Cache file names (the decoding settings), checkpoint fingerprints and the
data checks' key all come from here, so that "the same values" means the
same thing everywhere. No TensorFlow.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np


def json_digest(value) -> str:
    """Hex sha256 of ``value`` as canonical JSON (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def array_digest(array) -> str:
    """Hex sha256 of an array's shape, dtype and bytes (C order)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()
