"""Seeded random subsets of rows: the one way a run samples.

The head's validation sample, the data checks' sample of a large set and the
sample their PCA bases are fit on all draw through ``sample_rows``, so a
given seed picks the same rows wherever it is used.
"""

import numpy as np


def sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    """int64 row indices, ascending: all n rows when n <= size, else `size` drawn with `seed`."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
