"""The data checks' CSVs in the output folder: label_issues.csv and near_duplicates.csv.

`write_label_issues` / `write_near_duplicates` write them (atomically, image
paths escaped to one line, formula-like cells quoted); `read_label_issues` /
`read_near_duplicates` read them back, refusing what retrain did not write.
"""

from __future__ import annotations

import csv
import io
from dataclasses import astuple, fields
from pathlib import Path

import numpy as np

from retrain.errors import RetrainError
from retrain.evaluation.label_issues import LabelIssue
from retrain.evaluation.near_duplicates import NearDuplicate
from retrain.files import atomic_write, received_files, text_escapes
from retrain.files.text_escapes import one_line

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
