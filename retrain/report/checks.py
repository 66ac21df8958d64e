"""The data checks' findings for a run's report: computed, reused or read back.

`find_data_checks` runs the data checks on the bottleneck vectors
(retrain.evaluation.label_issues and .near_duplicates) and renders thumbnails
of what they found; a rerun with the same inputs (`data_checks_key`, kept in
CHECKS_FILE) reuses the previous run's findings instead. `read_checks` reads them back from an output
folder for the page; only regular files of bounded size are read
(retrain.files.received_files).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain.errors import RetrainError
from retrain.evaluation import check_files, label_issues, near_duplicates
from retrain.files import digests, received_files
from retrain.files.text_escapes import one_line
from retrain.report.thumbnails import MAX_THUMBNAIL_BYTES, render_thumbnails, thumbnail_path

logger = logging.getLogger(__name__)

# How many rows of each list get thumbnails on the page; the CSV files hold all.
SHOWN_LABEL_ISSUES = 48
SHOWN_DUPLICATES = 24
# Beside the CSVs: the key of the inputs they were computed from (`data_checks_key`).
CHECKS_FILE = "data_checks.json"
# Raise when the checks' method changes, so that no run reuses older findings.
CHECKS_VERSION = 2


def shown_check_images(issues, duplicates) -> list[str]:
    """The relative paths the page shows for the data checks' top rows (no repeats)."""
    paths = [issue.image for issue in issues[:SHOWN_LABEL_ISSUES]]
    for pair in duplicates[:SHOWN_DUPLICATES]:
        paths += [pair.image_a, pair.image_b]
    return list(dict.fromkeys(paths))


@dataclass
class DataChecks:
    """The data checks' findings, and thumbnails of the images the page shows for them.

    key: `data_checks_key` of the inputs; reused: True when the findings were
    read from the previous run's output folder instead of computed.
    checked, total: images the checks looked at, of the run's images
    (fewer when a large set was sampled, `check_limits.checked_rows`).
    """

    issues: list
    duplicates: list
    thumbnails: dict[str, bytes]
    key: str = ""
    reused: bool = False
    checked: int = 0
    total: int = 0

    @property
    def sampled(self) -> str:
        return sample_note(self.checked, self.total)


def sample_note(checked: int, total: int) -> str:
    """ ", among a random sample of k of the n images" when the checks saw a sample, else ""."""
    if checked >= total:
        return ""
    return f", among a random sample of {checked:,} of the {total:,} images"


def data_checks_key(
    bottlenecks: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    images: list[str],
    splits: list[str],
    seed: int = 0,
    total_images: int | None = None,
) -> str:
    """Hex sha256 of everything the data checks' findings depend on.

    The vectors themselves (float32 bytes), every checked image's path, class
    and split, how many images the run has (the checked ones may be a sample),
    the class names, the seed and the checks' method (CHECKS_VERSION, the
    near-duplicate threshold).
    """
    return digests.json_digest(
        {
            "version": CHECKS_VERSION,
            "class_names": list(class_names),
            "seed": seed,
            "total_images": len(labels) if total_images is None else int(total_images),
            "max_distance": near_duplicates.DUPLICATE_DISTANCE,
            "vectors": digests.array_digest(np.asarray(bottlenecks, dtype=np.float32)),
            "images": [
                [image, int(label), split] for image, label, split in zip(images, labels, splits)
            ],
        }
    )


def find_data_checks(
    bottlenecks: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    images: list[str],
    splits: list[str],
    image_dir,
    seed: int = 0,
    previous_dir=None,
    total_images: int | None = None,
) -> DataChecks:
    """Label issues and near-duplicate pairs of the images; nothing is written.

    bottlenecks: float [n, d]; labels: int [n]; images, splits: n relative
    paths (under image_dir) and split buckets. It needs neither the head nor
    TensorFlow, so a run computes it, and the thumbnails the page will show
    of its findings, while the head trains.

    previous_dir: the previous run's output folder, or None. When its
    findings were computed from the same inputs (`data_checks_key`, kept in
    CHECKS_FILE), they and their thumbnails are read from it instead: a
    rerun that only changes training settings does not redo the checks
    (minutes for 50,000 images).
    total_images: the run's images when these n are a sample of them
    (`check_limits.checked_rows`); None when they are all.
    """
    total = len(labels) if total_images is None else int(total_images)
    key = data_checks_key(bottlenecks, labels, class_names, images, splits, seed, total)
    previous = _previous_checks(previous_dir, key) if previous_dir is not None else None
    if previous is not None:
        issues, duplicates = previous
    else:
        issues = label_issues.find_label_issues(bottlenecks, labels, class_names, images, seed=seed)
        duplicates = near_duplicates.find_near_duplicates(bottlenecks, images, splits)
    shown = shown_check_images(issues, duplicates)
    thumbnails = {}
    if previous is not None:
        for image in shown:
            try:
                thumbnails[image] = received_files.read_bytes(
                    Path(previous_dir) / thumbnail_path(image), MAX_THUMBNAIL_BYTES
                )
            except (OSError, RetrainError) as error:
                # Made again below: one unreadable (or foreign) thumbnail costs one render.
                logger.warning(
                    "Report: the previous run's thumbnail of %s is not reused (%s); "
                    "it is made again.",
                    one_line(image),
                    one_line(str(error)),
                )
    thumbnails.update(
        render_thumbnails(image_dir, [image for image in shown if image not in thumbnails])
    )
    return DataChecks(
        issues,
        duplicates,
        thumbnails,
        key,
        reused=previous is not None,
        checked=len(labels),
        total=total,
    )


def _previous_checks(previous_dir, key):
    """(issues, duplicates) of previous_dir if computed from inputs with this key, else None.

    The folder may hold anything: only regular files of bounded size are read.
    """
    folder = Path(previous_dir)
    try:
        if json.loads(received_files.read_text(folder / CHECKS_FILE)).get("key") != key:
            return None
        return (
            check_files.read_label_issues(folder / check_files.LABEL_ISSUES_FILE),
            check_files.read_near_duplicates(folder / check_files.NEAR_DUPLICATES_FILE),
        )
    except FileNotFoundError:
        return None  # no previous run with data checks: nothing failed
    except (OSError, ValueError, AttributeError, KeyError, RetrainError) as error:
        # Files not ours, or damaged: the checks are computed afresh.
        logger.warning(
            "Not reusing the previous data checks in %s: %s",
            one_line(str(folder)),
            one_line(str(error)),
        )
        return None


def checks_summary(checks: DataChecks) -> str:
    """The run's one line about the data checks."""
    straddling = sum(pair.straddles_splits for pair in checks.duplicates)
    reused = (
        " Unchanged images, labels, split and vectors: reused from the previous run."
        if checks.reused
        else ""
    )
    return (
        f"Data checks: {len(checks.issues)} suspicious labels in "
        f"{check_files.LABEL_ISSUES_FILE}, {len(checks.duplicates)} near-duplicate pairs in "
        f"{check_files.NEAR_DUPLICATES_FILE} ({straddling} across splits){checks.sampled}."
        f"{reused}"
    )


def read_checks(out: Path):
    """(issues, duplicates, sample note) of an output folder; None for a list not written.

    Raises:
      RetrainError naming a file that is there but is no regular file, too
      large or not a CSV retrain wrote.
    """
    issues_path = out / check_files.LABEL_ISSUES_FILE
    duplicates_path = out / check_files.NEAR_DUPLICATES_FILE
    issues = check_files.read_label_issues(issues_path) if os.path.lexists(issues_path) else None
    duplicates = (
        check_files.read_near_duplicates(duplicates_path)
        if os.path.lexists(duplicates_path)
        else None
    )
    try:
        counts = json.loads(received_files.read_text(out / CHECKS_FILE))
        note = sample_note(int(counts["checked"]), int(counts["total"]))
    except FileNotFoundError:
        note = ""  # a run from before the counts were kept: it checked every image (no failure)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise RetrainError(
            f"Cannot read {out / CHECKS_FILE}: {type(error).__name__}: {error}. "
            "Rerun retrain to write it again."
        ) from None
    return issues, duplicates, note
