"""Seeded random subsets of rows: the one way a run samples.

The head's validation sample, the data checks' sample of a large set and the
sample their PCA bases are fit on all draw through ``sample_rows``, so a
given seed picks the same rows wherever it is used.
"""

import itertools

import numpy as np


def sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    """int64 row indices, ascending: all n rows when n <= size, else `size` drawn with `seed`."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def spread_over_classes(entries, count: int) -> list:
    """Up to `count` of `entries` (ImageEntry), the classes taking turns in label order, each
    class's entries in cache-key (hash) order: a fixed sample, spread over the classes, the
    same whatever order `entries` come in (the int8 TFLite calibration images, the unknown
    detector's reference vectors)."""
    by_class: dict = {}
    for entry in sorted(entries, key=lambda entry: entry.key):
        by_class.setdefault(entry.label_index, []).append(entry)
    turns = itertools.zip_longest(*(by_class[label] for label in sorted(by_class)))
    chosen = [entry for turn in turns for entry in turn if entry is not None]
    return chosen[:count]
