"""Near-duplicate images: pairs whose cached bottleneck vectors are nearly parallel.

Nearest-neighbour search (scikit-learn's `NearestNeighbors`) on a PCA
projection of the unit-length vectors proposes a few neighbours per image;
each candidate pair is then scored by the exact cosine distance of the full
vectors, and pairs closer than `max_distance` are kept, closest first. A group
of m mutually near-identical images is listed as m - 1 pairs (its minimum
spanning tree), not every pair of it. No all-pairs distance matrix is ever
built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize
from threadpoolctl import threadpool_limits

from retrain.data.sampling import sample_rows
from retrain.errors import RetrainError
from retrain.evaluation.check_limits import PCA_SAMPLE, THREADS

# Neighbours proposed per image, and the PCA width of the search space. The
# search is brute force (n^2 * 32 multiply-adds, in blocks), exact for each
# image's neighbours in that space; on Caltech-101 and flowers128 it found the
# same planted pairs at 16, 32 and 64 components.
DUPLICATE_NEIGHBOURS = 5
DUPLICATE_COMPONENTS = 32
# Cosine distance under which two images count as near-duplicates. With Lite0,
# copies resized to 60-85% and re-encoded as JPEG measured 0.007-0.021 apart
# on flowers128 and 0.006-0.071 on Caltech-101 photos (see README, "Data checks").
DUPLICATE_DISTANCE = 0.1
# Candidate pairs whose exact distance is computed at once (both sides'
# vectors gathered: 2 x 8,192 x 1,280 float32 is 84 MB).
PAIR_CHUNK = 8192


@dataclass(frozen=True)
class NearDuplicate:
    """Two images whose bottlenecks are nearly parallel; distance = 1 - cosine similarity."""

    image_a: str
    image_b: str
    split_a: str
    split_b: str
    distance: float

    @property
    def straddles_splits(self) -> bool:
        """True when the two images are in different buckets (inflates test accuracy)."""
        return self.split_a != self.split_b


def find_near_duplicates(
    bottlenecks: np.ndarray,
    images: list[str],
    splits: list[str],
    max_distance: float = DUPLICATE_DISTANCE,
) -> list[NearDuplicate]:
    """Pairs of images with cosine distance <= max_distance, closest first.

    bottlenecks: float [n, d]; images, splits: n relative paths and split
    buckets. Each image proposes its DUPLICATE_NEIGHBOURS nearest neighbours in a
    DUPLICATE_COMPONENTS-wide PCA space; candidates are re-scored exactly.
    """
    x = np.asarray(bottlenecks, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(images) or len(images) != len(splits):
        raise RetrainError(
            f"bottlenecks must be [n, d] with one path and split per row. Received: "
            f"shape={x.shape}, {len(images)} paths, {len(splits)} splits"
        )
    if len(x) < 2:
        return []
    with threadpool_limits(THREADS):
        return _near_duplicates(x, images, splits, max_distance)


def _near_duplicates(x, images, splits, max_distance):
    unit = normalize(x)
    search = unit
    components = min(DUPLICATE_COMPONENTS, x.shape[1], len(x))
    if components < x.shape[1]:
        sample = sample_rows(len(x), PCA_SAMPLE)
        pca = PCA(components, random_state=0).fit(unit[sample])
        search = normalize(pca.transform(unit)).astype(np.float32)
    neighbours = min(DUPLICATE_NEIGHBOURS + 1, len(x))
    _, index = NearestNeighbors(n_neighbors=neighbours).fit(search).kneighbors(search)
    first = np.repeat(np.arange(len(x)), neighbours)
    second = index.ravel()
    keep = first != second
    pairs = np.unique(np.sort(np.stack([first[keep], second[keep]], axis=1), axis=1), axis=0)
    distance = _cosine_distances(unit, pairs)
    close = distance <= max_distance
    pairs, distance = pairs[close], distance[close]
    order = np.lexsort((pairs[:, 1], pairs[:, 0], distance))
    return [
        NearDuplicate(images[a], images[b], splits[a], splits[b], round(float(d), 6))
        for a, b, d in _spanning_pairs(pairs[order], distance[order], len(x))
    ]


def _cosine_distances(unit, pairs, chunk=PAIR_CHUNK):
    """1 - cosine similarity (at least 0) of each pair of rows of unit-length vectors.

    A chunk of pairs at a time: gathering both sides of every candidate pair
    at once took 2.6 GB for 50,000 images (five candidates each).
    """
    distance = np.empty(len(pairs), unit.dtype)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        distance[start : start + chunk] = 1.0 - np.einsum(
            "ij,ij->i", unit[part[:, 0]], unit[part[:, 1]]
        )
    return np.maximum(distance, 0.0)


def _spanning_pairs(pairs: np.ndarray, distance: np.ndarray, n: int):
    """The pairs, in the given (closest first) order, that join two groups not yet joined.

    A group of m near-identical images then takes m - 1 rows (each image beside
    its nearest, the group's minimum spanning tree: Kruskal's algorithm) instead of
    m (m - 1) / 2, so one large group cannot push every other pair down the list.
    """
    parent = np.arange(n)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (a, b), d in zip(pairs, distance):
        first, second = root(a), root(b)
        if first != second:
            parent[second] = first
            yield a, b, d
