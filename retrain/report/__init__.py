"""The run's report: report.html, its figures and thumbnails, built from the run's record.

    python -m retrain.report OUTPUT_DIR     (or the `retrain-report` command)

rebuilds OUTPUT_DIR/report.html, training_curves.png and confusion_matrix.png
from what a run saved there (retrain.evaluation.run_record, label_issues.csv,
near_duplicates.csv, thumbnails/), without the cache, the model or TensorFlow;
`--screenshot FILE.png` also renders the page with headless Chromium.

During a run, `find_data_checks` runs the data checks on the bottleneck
vectors (retrain.evaluation.data_checks) and renders thumbnails of what they found
while the head trains; at the end, `write_run_report` writes their CSVs and a
small JPEG thumbnail of every image the page shows into
OUTPUT_DIR/thumbnails/, then calls `build`.
The page is one HTML file with inline CSS and no scripts; it refers only to
files beside it, so it opens from disk in any browser, with no network.

A part that fails (the checks, a CSV, the thumbnails, a figure, the page) is a
warning, never a lost run (retrain.report.report_parts). The folder may come from
someone else: only regular files of bounded size are read from it
(retrain.files.received_files), and every file is written with retrain.files.atomic_write,
so a symbolic link at its name is replaced, never written through.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain.files import atomic_write, digests, received_files
from retrain.evaluation import data_checks, run_record
from retrain import evaluation
from retrain.report import figures
from retrain.errors import RetrainError
from retrain.report.report_parts import ReportOutcome, ReportParts
from retrain.files.text_escapes import one_line, utf8
from retrain.report.thumbnails import (MAX_THUMBNAIL_BYTES, THUMBNAIL_DIR, render_thumbnails,
                                thumbnail_path, write_thumbnails)

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrix.png"
# How many rows of each list get thumbnails on the page; the CSV files hold all.
SHOWN_MISCLASSIFIED = 60
SHOWN_LABEL_ISSUES = 48
SHOWN_DUPLICATES = 24
# Beside the CSVs: the key of the inputs they were computed from (`data_checks_key`).
CHECKS_FILE = "data_checks.json"
# Raise when the checks' method changes, so that no run reuses older findings.
CHECKS_VERSION = 2


@dataclass
class Mistake:
    """A misclassified test image: path, true and predicted class, probability of the prediction."""

    image: str
    true: str
    predicted: str
    confidence: float


def misclassified_tests(record: run_record.RunRecord) -> list[Mistake]:
    """The test images the head got wrong, most confident mistakes first."""
    rows = record.rows("testing")
    probabilities = record.probabilities.get("testing")
    if probabilities is None or not len(rows):
        return []
    predicted = probabilities.argmax(axis=1)
    mistakes = [Mistake(record.images[row], record.class_names[record.labels[row]],
                        record.class_names[guess], float(probabilities[i, guess]))
                for i, (row, guess) in enumerate(zip(rows, predicted)) if guess != record.labels[row]]
    return sorted(mistakes, key=lambda mistake: -mistake.confidence)


def shown_images(record, issues, duplicates) -> list[str]:
    """The relative paths of every image the page shows a thumbnail of (no repeats)."""
    paths = [m.image for m in misclassified_tests(record)[:SHOWN_MISCLASSIFIED]]
    return list(dict.fromkeys(paths + shown_check_images(issues, duplicates)))


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
    (fewer when a large set was sampled, `data_checks.checked_rows`).
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
    """", among a random sample of k of the n images" when the checks saw a sample, else ""."""
    if checked >= total:
        return ""
    return f", among a random sample of {checked:,} of the {total:,} images"


def data_checks_key(bottlenecks: np.ndarray, labels: np.ndarray, class_names: list[str],
                    images: list[str], splits: list[str], seed: int = 0,
                    total_images: int | None = None) -> str:
    """Hex sha256 of everything the data checks' findings depend on.

    The vectors themselves (float32 bytes), every checked image's path, class
    and split, how many images the run has (the checked ones may be a sample),
    the class names, the seed and the checks' method (CHECKS_VERSION, the
    near-duplicate threshold).
    """
    return digests.json_digest({
        "version": CHECKS_VERSION, "class_names": list(class_names), "seed": seed,
        "total_images": len(labels) if total_images is None else int(total_images),
        "max_distance": data_checks.DUPLICATE_DISTANCE,
        "vectors": digests.array_digest(np.asarray(bottlenecks, dtype=np.float32)),
        "images": [[image, int(label), split] for image, label, split in zip(images, labels, splits)],
    })


def find_data_checks(bottlenecks: np.ndarray, labels: np.ndarray, class_names: list[str],
                     images: list[str], splits: list[str], image_dir, seed: int = 0,
                     previous_dir=None, total_images: int | None = None) -> DataChecks:
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
    (`data_checks.checked_rows`); None when they are all.
    """
    total = len(labels) if total_images is None else int(total_images)
    key = data_checks_key(bottlenecks, labels, class_names, images, splits, seed, total)
    previous = _previous_checks(previous_dir, key) if previous_dir is not None else None
    if previous is not None:
        issues, duplicates = previous
    else:
        issues = data_checks.find_label_issues(bottlenecks, labels, class_names, images, seed=seed)
        duplicates = data_checks.find_near_duplicates(bottlenecks, images, splits)
    shown = shown_check_images(issues, duplicates)
    thumbnails = {}
    if previous is not None:
        for image in shown:
            # A thumbnail that cannot be read (or is no regular file) is made again below.
            with contextlib.suppress(OSError, RetrainError):
                thumbnails[image] = received_files.read_bytes(
                    Path(previous_dir) / thumbnail_path(image), MAX_THUMBNAIL_BYTES)
    thumbnails.update(render_thumbnails(image_dir, [image for image in shown
                                                    if image not in thumbnails]))
    return DataChecks(issues, duplicates, thumbnails, key, reused=previous is not None,
                      checked=len(labels), total=total)


def _previous_checks(previous_dir, key):
    """(issues, duplicates) of previous_dir if computed from inputs with this key, else None.

    The folder may hold anything: only regular files of bounded size are read.
    """
    folder = Path(previous_dir)
    try:
        if json.loads(received_files.read_text(folder / CHECKS_FILE)).get("key") != key:
            return None
        return (data_checks.read_label_issues(folder / data_checks.LABEL_ISSUES_FILE),
                data_checks.read_near_duplicates(folder / data_checks.NEAR_DUPLICATES_FILE))
    except FileNotFoundError:
        return None  # no previous run with data checks
    except (OSError, ValueError, AttributeError, KeyError, RetrainError) as error:
        # Files not ours, or damaged: the checks are computed afresh.
        logger.info("Not reusing the previous data checks in %s: %s", one_line(str(folder)),
                    one_line(str(error)))
        return None


def checks_summary(checks: DataChecks) -> str:
    """The run's one line about the data checks."""
    straddling = sum(pair.straddles_splits for pair in checks.duplicates)
    reused = (" Unchanged images, labels, split and vectors: reused from the previous run."
              if checks.reused else "")
    return (f"Data checks: {len(checks.issues)} suspicious labels in "
            f"{data_checks.LABEL_ISSUES_FILE}, {len(checks.duplicates)} near-duplicate pairs in "
            f"{data_checks.NEAR_DUPLICATES_FILE} ({straddling} across splits){checks.sampled}."
            f"{reused}")


def write_run_report(record: run_record.RunRecord, checks, output_dir) -> ReportOutcome:
    """The end of a run: the data checks' CSVs, thumbnails, figures and report.html.

    checks: the `find_data_checks` of the record's images, or a callable
    returning it (a Future's `result`), called here so that its failure is
    one of the report's. Never raises an Exception: a part that fails is a
    warning and is listed in the outcome's parts (see ReportParts); the
    page is still written without it when it can be.
    """
    out = Path(output_dir)
    parts = ReportParts()
    found = None
    with parts.part(f"data checks ({data_checks.LABEL_ISSUES_FILE}, "
                    f"{data_checks.NEAR_DUPLICATES_FILE})"):
        found = checks() if callable(checks) else checks
    if found is not None:
        _write_checks(found, out, parts)
    issues, duplicates = (found.issues, found.duplicates) if found is not None else ([], [])
    with parts.part(THUMBNAIL_DIR + "/"):
        write_thumbnails(record.image_dir, shown_images(record, issues, duplicates), out,
                         found.thumbnails if found is not None else None)
    page = None
    with parts.part(REPORT_FILE):
        page = build(out, parts)
    return ReportOutcome(page, found, parts)


def _write_checks(checks: DataChecks, out: Path, parts: ReportParts) -> None:
    """The checks' two CSVs, then data_checks.json (only beside both: a later run reuses them)."""
    written = 0
    with parts.part(data_checks.LABEL_ISSUES_FILE):
        data_checks.write_label_issues(checks.issues, out / data_checks.LABEL_ISSUES_FILE)
        written += 1
    with parts.part(data_checks.NEAR_DUPLICATES_FILE):
        data_checks.write_near_duplicates(checks.duplicates, out / data_checks.NEAR_DUPLICATES_FILE)
        written += 1
    if written == 2:
        with parts.part(CHECKS_FILE):
            atomic_write.write_text(out / CHECKS_FILE, json.dumps(
                {"key": checks.key, "checked": checks.checked, "total": checks.total}) + "\n")


def _evaluations(record) -> dict[str, evaluation.Evaluation]:
    result = {}
    for split in run_record.EVALUATED_SPLITS:
        rows = record.rows(split)
        if len(rows) and split in record.probabilities:
            result[split] = evaluation.evaluate(record.probabilities[split], record.labels[rows],
                                                record.class_names)
    return result


def _read_checks(out: Path):
    """(issues, duplicates, sample note) of an output folder; None for a list not written.

    Raises:
      RetrainError naming a file that is there but is no regular file, too
      large or not a CSV retrain wrote.
    """
    issues_path = out / data_checks.LABEL_ISSUES_FILE
    duplicates_path = out / data_checks.NEAR_DUPLICATES_FILE
    issues = data_checks.read_label_issues(issues_path) if os.path.lexists(issues_path) else None
    duplicates = (data_checks.read_near_duplicates(duplicates_path)
                  if os.path.lexists(duplicates_path) else None)
    try:
        counts = json.loads(received_files.read_text(out / CHECKS_FILE))
        note = sample_note(int(counts["checked"]), int(counts["total"]))
    except FileNotFoundError:
        note = ""  # a run from before the counts were kept: it checked every image
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise RetrainError(f"Cannot read {out / CHECKS_FILE}: {type(error).__name__}: {error}. "
                           "Rerun retrain to write it again.") from None
    return issues, duplicates, note


def class_table(record, evaluations) -> list[dict]:
    """One row per class: counts per split, class weight, metrics per evaluated split.

    Rows follow the confusion matrix's order (recall on test, worst first).
    """
    counts = record.counts()
    reference = evaluations.get("testing") or evaluations.get("validation")
    order = (figures.recall_order(reference.confusion, record.class_names) if reference
             else np.arange(len(record.class_names)))
    largest = max(int(counts[:, 0].max()), 1)
    rows = []
    for index in order:
        rows.append({
            "name": record.class_names[index], "training": int(counts[index, 0]),
            "validation": int(counts[index, 1]), "testing": int(counts[index, 2]),
            "total": int(counts[index].sum()), "bar": round(100 * counts[index, 0] / largest, 1),
            "weight": None if record.class_weights is None else record.class_weights[index],
            "metrics": {split: {"precision": result.precision[index], "recall": result.recall[index],
                                "f1": result.f1[index], "support": int(result.support[index])}
                        for split, result in evaluations.items()},
        })
    return rows


def build(output_dir, parts: ReportParts | None = None) -> Path:
    """Draws the figures and writes report.html from the record in output_dir; returns its path.

    A figure that cannot be drawn is a warning recorded in `parts` (a new
    ReportParts when None) and the page is written without it. Every file is
    written with atomic_write: a link left at its name is replaced, never
    written through; only regular files of bounded size are read.

    Raises:
      RetrainError when output_dir holds no readable run record or holds
      data-check files retrain did not write; OSError when the page itself
      cannot be written.
    """
    out = Path(output_dir)
    parts = ReportParts() if parts is None else parts
    record = run_record.load(out)
    evaluations = _evaluations(record)
    issues, duplicates, checks_sample = _read_checks(out)
    curves = confusion = None
    with parts.part(CURVES_FILE):
        figures.plot_training_curves(record.history, out / CURVES_FILE, record.best_step)
        curves = CURVES_FILE if record.history else None
    confusion_split = "testing" if "testing" in evaluations else "validation"
    if confusion_split in evaluations:
        with parts.part(CONFUSION_FILE):
            figures.plot_confusion_matrix(
                evaluations[confusion_split].confusion, record.class_names, out / CONFUSION_FILE,
                title=f"Confusion matrix ({'test' if confusion_split == 'testing' else 'validation'})")
            confusion = CONFUSION_FILE
    thumbnails_linked = os.path.islink(out / THUMBNAIL_DIR)

    def thumbnail(image):
        relative = thumbnail_path(image)
        usable = not thumbnails_linked and received_files.is_regular(out / relative)
        return relative if usable else None

    page = _render_page(
        record=record, evaluations=evaluations, curves=curves, confusion=confusion,
        confusion_split=confusion_split, issues=issues, duplicates=duplicates,
        checks_sample=checks_sample, thumbnail=thumbnail)
    return atomic_write.write_text(out / REPORT_FILE, page)


def _render_page(record, evaluations, issues, duplicates, **values) -> str:
    """report.html.j2 rendered with the run's values (autoescaped HTML)."""
    import jinja2

    counts = record.counts()
    training_counts = counts[:, 0][counts[:, 0] > 0]
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("retrain.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        # Every text value on the page as UTF-8 can hold it: a settings value
        # with a name that is not UTF-8 (a lone surrogate) shows as \xNN.
        finalize=lambda value: utf8(value) if type(value) is str else value)
    return environment.get_template("report.html.j2").render(
        record=record,
        generated=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        evaluations=evaluations,
        split_totals=counts.sum(axis=0).tolist(),
        imbalance=(int(training_counts.max()) / int(training_counts.min())) if len(training_counts) else 1.0,
        classes=class_table(record, evaluations),
        mistakes=misclassified_tests(record),
        shown_mistakes=SHOWN_MISCLASSIFIED,
        issues=issues, shown_issues=SHOWN_LABEL_ISSUES,
        duplicates=duplicates, shown_duplicates=SHOWN_DUPLICATES,
        straddling=sum(pair.straddles_splits for pair in duplicates or []),
        files={"issues": data_checks.LABEL_ISSUES_FILE, "duplicates": data_checks.NEAR_DUPLICATES_FILE},
        **values,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m retrain.report` and the `retrain-report` console script.

    Exit status 0 when the page was written (a missing figure is a warning and
    a "Report incomplete" line on stderr); 2 with one stderr line when the
    folder cannot give a page (no record, a file that is no regular file, too
    large, or not what retrain wrote).
    """
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    parser = argparse.ArgumentParser(
        prog="python -m retrain.report",
        description="Rebuild report.html and its figures from the output folder of a retrain run.")
    parser.add_argument("output_dir", help="the --output_dir of a finished run")
    parser.add_argument("--screenshot", metavar="FILE.png",
                        help="also render the page with headless Chromium into this PNG")
    parser.add_argument("--width", type=int, default=1280, help="screenshot width in pixels (default 1280)")
    parser.add_argument("--height", type=int, default=3000, help="screenshot height in pixels (default 3000)")
    args = parser.parse_args(argv)
    parts = ReportParts()
    try:
        path = build(args.output_dir, parts)
        print(f"Wrote {path}")
        if parts.missing:
            print(parts.line(), file=sys.stderr)
        if args.screenshot:
            from retrain.report import page_screenshot

            print(f"Wrote {page_screenshot.screenshot(path, args.screenshot, args.width, args.height)}")
    except RetrainError as error:
        print(f"retrain.report: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - a received folder's content must not give a traceback
        print(f"retrain.report: error: cannot rebuild the page in {one_line(args.output_dir)}: "
              f"{type(error).__name__}: {one_line(str(error))}. Is it the output folder of a "
              "retrain run, unchanged?", file=sys.stderr)
        return 2
    return 0
