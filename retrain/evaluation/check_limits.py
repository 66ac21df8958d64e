"""What bounds the cost of the data checks: how many images, BLAS threads, PCA sample.

Shared by `label_issues` and `near_duplicates`, and by the run that picks the
images to check (`checked_rows`).
"""

from __future__ import annotations

import numpy as np

from retrain.data.sampling import sample_rows

# Above this many images, the PCA bases are fit on a random sample of this size.
PCA_SAMPLE = 20_000
# Most images the checks look at (`checked_rows`): every vector checked is in
# memory (50,000 Lite0 vectors are 256 MB as float32) and the neighbour search
# grows as n^2, so a larger set is checked on a random sample of this size
# (drawn with the run's seed). A near-duplicate pair is then found only when
# both of its images are in the sample.
CHECKED_IMAGES = 50_000
# BLAS / OpenMP threads of the checks. These are small dense problems: a
# second thread gains little, and on a busy machine the threads' hand-offs
# lose a lot (one regression fit on 1,034 vectors: 0.7 s with 1 thread,
# 26 s with 2, on a shared 2-core machine).
THREADS = 1


def checked_rows(n: int, seed: int = 0, most: int = CHECKED_IMAGES) -> np.ndarray:
    """int64 rows, ascending, of the images the checks look at out of n: all, or `most` at random."""
    return sample_rows(n, most, seed)
