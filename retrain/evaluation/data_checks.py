"""Data checks on the cached bottleneck vectors: suspicious labels and near-duplicate images.

Both checks use only the vectors the run already has in memory, so they cost
seconds, not a pass over the images:

* `find_label_issues`: a logistic regression is cross-validated on the vectors
  (scikit-learn's `cross_val_predict`), so every image gets class probabilities
  from a model that never saw it. The images whose given label those
  probabilities disagree with (another class is more likely, or cleanlab's
  `find_label_issues` flags them) are listed, ranked by cleanlab's label
  quality score (lowest = most suspicious).
* `find_near_duplicates`: nearest-neighbour search (scikit-learn's
  `NearestNeighbors`) on a PCA projection of the unit-length vectors proposes a
  few neighbours per image; each candidate pair is then scored by the exact
  cosine distance of the full vectors, and pairs closer than `max_distance`
  are kept, closest first. A group of m mutually near-identical images is
  listed as m - 1 pairs (its minimum spanning tree), not every pair of it. No
  all-pairs distance matrix is ever built.

`write_label_issues` / `write_near_duplicates` write the CSVs of the output
folder and `read_label_issues` / `read_near_duplicates` read them back.
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import cleanlab.filter
import cleanlab.rank
import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler, normalize
from threadpoolctl import threadpool_limits

from retrain.data.sampling import sample_rows
from retrain.errors import RetrainError
from retrain.files import atomic_write, received_files, text_escapes
from retrain.files.text_escapes import one_line

# Cross-validation folds for the out-of-sample probabilities (fewer when the
# smallest class has fewer images).
LABEL_ISSUE_FOLDS = 5
# The regression sees the vectors projected on this many principal components.
# On Lite0 vectors with 12 planted errors it ranked them as high as the full
# 1280 dimensions did (Caltech-101, 17 classes: 12 of 12 in the top 36 either
# way; flowers128: 5 with both), at a fraction of the cost.
LABEL_ISSUE_COMPONENTS = 64
# Each fold's regression is fit on at most this many images (every class keeps
# an equal share); the held-out images of the fold are all scored. This caps
# the cost of large sets: fitting dominates, scoring is one matrix product.
LABEL_ISSUE_FIT_ROWS = 20_000
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
# Above this many images, the PCA bases are fit on a random sample of this size.
PCA_SAMPLE = 20_000
# Candidate pairs whose exact distance is computed at once (both sides'
# vectors gathered: 2 x 8,192 x 1,280 float32 is 84 MB).
PAIR_CHUNK = 8192
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


@dataclass(frozen=True)
class LabelIssue:
    """An image whose given label the cross-validated model disagrees with.

    score: cleanlab's label quality in [0, 1] (self-confidence: the
    out-of-sample probability of the given label); lower is more suspicious.
    """

    image: str
    given: str
    suggested: str
    score: float


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


def out_of_sample_probabilities(
    bottlenecks: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0
) -> np.ndarray:
    """Class probabilities float32 [n, num_classes] from models that never saw the row's image.

    bottlenecks: float [n, d]; labels: int [n] in [0, num_classes). The
    vectors are standardized and projected on LABEL_ISSUE_COMPONENTS principal
    components (fit without labels, on all rows); a LogisticRegression is
    cross-validated on them with stratified folds (at most LABEL_ISSUE_FOLDS,
    at least 2), each fit on at most LABEL_ISSUE_FIT_ROWS images.
    """
    x, labels = _check(bottlenecks, labels, num_classes)
    with threadpool_limits(THREADS):
        return _cross_validated(x, labels, num_classes, seed)


def _cross_validated(x, labels, num_classes, seed):
    counts = np.bincount(labels, minlength=num_classes)
    folds = int(np.clip(counts[counts > 0].min(), 2, LABEL_ISSUE_FOLDS))
    # The projection is fit once on every image's vector: it never sees a
    # label, so no fold learns anything of its held-out labels from it, and
    # it costs one PCA instead of one a fold.
    scaled = StandardScaler().fit_transform(x)
    components = min(LABEL_ISSUE_COMPONENTS, x.shape[1], len(x) - 1)
    if components < x.shape[1]:
        pca = PCA(components, random_state=seed).fit(scaled[sample_rows(len(x), PCA_SAMPLE)])
        scaled = pca.transform(scaled)
    model = LogisticRegression(C=0.1, max_iter=100)
    with warnings.catch_warnings():
        # A class smaller than the fold count, or absent from one fold's
        # training part, is expected in small data; cross_val_predict then
        # gives that class probability 0 in the fold, which is right.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        probabilities = cross_val_predict(
            model,
            scaled,
            labels,
            method="predict_proba",
            cv=list(_capped_folds(labels, folds, LABEL_ISSUE_FIT_ROWS, seed)),
        )
    full = np.zeros((len(x), num_classes), np.float32)
    full[:, np.unique(labels)] = probabilities
    return full


def _capped_folds(labels: np.ndarray, folds: int, fit_rows: int, seed: int):
    """Stratified (training rows, held-out rows) splits; training rows capped at fit_rows.

    Held-out rows partition all rows, as cross_val_predict needs. Above the
    cap, each class keeps at most an equal share of its training rows.
    """
    rng = np.random.default_rng(seed)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for train, held_out in splitter.split(np.zeros((len(labels), 1)), labels):
        if len(train) > fit_rows:
            classes = np.unique(labels[train])
            share = max(1, fit_rows // len(classes))
            train = np.sort(
                np.concatenate(
                    [rng.permutation(train[labels[train] == c])[:share] for c in classes]
                )
            )
        yield train, held_out


def find_label_issues(
    bottlenecks: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    images: list[str],
    seed: int = 0,
) -> list[LabelIssue]:
    """Images whose label the cached vectors disagree with, most suspicious first.

    bottlenecks: float [n, d]; labels: int [n] class indices; images: n
    relative paths. Needs at least two images; fewer give an empty list.
    """
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise RetrainError(
            f"One image path per label is needed. Received: {len(images)} paths, "
            f"{len(labels)} labels"
        )
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        return []
    probabilities = out_of_sample_probabilities(bottlenecks, labels, len(class_names), seed)
    present = np.unique(labels)
    # cleanlab wants every class of the columns to occur in labels.
    local = np.searchsorted(present, labels)
    local_probabilities = probabilities[:, present]
    local_probabilities /= np.maximum(local_probabilities.sum(axis=1, keepdims=True), 1e-12)
    quality = cleanlab.rank.get_label_quality_scores(
        local, local_probabilities, method="self_confidence"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = cleanlab.filter.find_label_issues(local, local_probabilities, n_jobs=1)
    suggested = present[local_probabilities.argmax(axis=1)]
    rows = np.flatnonzero(flagged | (suggested != labels))
    rows = rows[np.argsort(quality[rows], kind="stable")]
    return [
        LabelIssue(
            images[row],
            class_names[labels[row]],
            class_names[suggested[row]],
            round(float(quality[row]), 6),
        )
        for row in rows
    ]


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


def checked_rows(n: int, seed: int = 0, most: int = CHECKED_IMAGES) -> np.ndarray:
    """int64 rows, ascending, of the images the checks look at out of n: all, or `most` at random."""
    return sample_rows(n, most, seed)


def _check(bottlenecks, labels, num_classes):
    x = np.asarray(bottlenecks, dtype=np.float32)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != x.shape[:1]:
        raise RetrainError(
            f"bottlenecks must be [n, d] and labels [n]. "
            f"Received: bottlenecks.shape={x.shape}, labels.shape={labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise RetrainError(
            f"labels must be class indices in [0, {num_classes}). "
            f"Received: range=[{labels.min()}, {labels.max()}]"
        )
    return x, labels.astype(np.int64)


LABEL_ISSUES_FILE = "label_issues.csv"
NEAR_DUPLICATES_FILE = "near_duplicates.csv"


def write_label_issues(issues: list[LabelIssue], path) -> Path:
    """Writes `image,given,suggested,score`, one row per issue in the given order."""
    return _write_rows(LabelIssue, issues, path)


def write_near_duplicates(pairs: list[NearDuplicate], path) -> Path:
    """Writes `image_a,image_b,split_a,split_b,distance`, one row per pair in the given order."""
    return _write_rows(NearDuplicate, pairs, path)


def read_label_issues(path) -> list[LabelIssue]:
    """The issues `write_label_issues` wrote (RetrainError naming the file if it cannot be)."""
    return _parsed(
        path,
        lambda row: LabelIssue(row["image"], row["given"], row["suggested"], _number(row["score"])),
        _read_rows(LabelIssue, path),
    )


def read_near_duplicates(path) -> list[NearDuplicate]:
    """The pairs `write_near_duplicates` wrote (RetrainError naming the file if it cannot be)."""
    return _parsed(
        path,
        lambda row: NearDuplicate(
            row["image_a"], row["image_b"], row["split_a"], row["split_b"], _number(row["distance"])
        ),
        _read_rows(NearDuplicate, path),
    )


def _number(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _parsed(path, make, rows):
    try:
        return [make(row) for row in rows]
    except ValueError as error:
        raise RetrainError(
            f"{path} holds a value retrain did not write: {error}. Rerun retrain to write it again."
        ) from None


def _write_rows(kind, rows, path) -> Path:
    """Writes rows of dataclass `kind` as CSV, atomically (a link at `path` is replaced,
    not followed); image paths as `text_escapes.one_line`, formula-like cells quoted."""
    header = [f.name for f in fields(kind)]
    paths = [name for name in header if name.startswith("image")]
    cells = (
        [one_line(value) if name in paths else value for name, value in zip(header, astuple(row))]
        for row in rows
    )
    return atomic_write.write_text(path, text_escapes.csv_rows(header, cells))


def _read_rows(kind, path) -> list[dict]:
    """The rows of a CSV `_write_rows` wrote, as {column: original text}.

    Raises:
      RetrainError naming the file when it is missing, not a regular file,
      too large, not UTF-8 or not a retrain CSV of this kind.
    """
    expected = [f.name for f in fields(kind)]
    try:
        text = received_files.read_text(path)
    except RetrainError:
        raise
    except (OSError, ValueError) as error:
        raise RetrainError(
            f"Cannot read {path}: {getattr(error, 'strerror', None) or error}. "
            "Rerun retrain without --no-report to write it."
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames != expected:
        raise RetrainError(
            f"{path} is not a retrain {Path(path).name}: its header must be "
            f"{','.join(expected)}. Received: {reader.fieldnames}"
        )
    try:
        rows = list(reader)
    except csv.Error as error:
        raise RetrainError(
            f"{path} is not a valid CSV file: {error}. Rerun retrain to write it again."
        ) from None
    if any(None in row or None in row.values() for row in rows):
        raise RetrainError(
            f"{path} has rows with more or fewer cells than its header "
            f"{','.join(expected)}. Rerun retrain to write it again."
        )
    return [{name: text_escapes.from_csv(value) for name, value in row.items()} for row in rows]
