"""The end of a run: the data checks' CSVs, thumbnails, figures and report.html.

A part that fails (the checks, a CSV, the thumbnails, a figure, the page) is a
warning, never a lost run (retrain.report.report_parts). Every file is
written with retrain.files.atomic_write, so a symbolic link at its name is
replaced, never written through.
"""

from __future__ import annotations

import json
from pathlib import Path

from retrain.evaluation import check_files, run_record
from retrain.files import atomic_write
from retrain.report.checks import CHECKS_FILE, DataChecks, shown_check_images
from retrain.report.confidence import most_unknown
from retrain.report.page import REPORT_FILE, SHOWN_MISCLASSIFIED, build, misclassified_tests
from retrain.report.report_parts import ReportOutcome, ReportParts
from retrain.report.thumbnails import THUMBNAIL_DIR, write_thumbnails


def shown_images(record, issues, duplicates) -> list[str]:
    """The relative paths of every image the page shows a thumbnail of (no repeats)."""
    paths = [m.image for m in misclassified_tests(record)[:SHOWN_MISCLASSIFIED]]
    paths += [shown["image"] for shown in most_unknown(record)]
    return list(dict.fromkeys(paths + shown_check_images(issues, duplicates)))


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
    with parts.part(
        f"data checks ({check_files.LABEL_ISSUES_FILE}, {check_files.NEAR_DUPLICATES_FILE})"
    ):
        found = checks() if callable(checks) else checks
    if found is not None:
        _write_checks(found, out, parts)
    issues, duplicates = (found.issues, found.duplicates) if found is not None else ([], [])
    with parts.part(THUMBNAIL_DIR + "/"):
        write_thumbnails(
            record.image_dir,
            shown_images(record, issues, duplicates),
            out,
            found.thumbnails if found is not None else None,
        )
    page = None
    with parts.part(REPORT_FILE):
        page = build(out, parts)
    return ReportOutcome(page, found, parts)


def _write_checks(checks: DataChecks, out: Path, parts: ReportParts) -> None:
    """The checks' two CSVs, then data_checks.json (only beside both: a later run reuses them)."""
    written = 0
    with parts.part(check_files.LABEL_ISSUES_FILE):
        check_files.write_label_issues(checks.issues, out / check_files.LABEL_ISSUES_FILE)
        written += 1
    with parts.part(check_files.NEAR_DUPLICATES_FILE):
        check_files.write_near_duplicates(checks.duplicates, out / check_files.NEAR_DUPLICATES_FILE)
        written += 1
    if written == 2:
        with parts.part(CHECKS_FILE):
            atomic_write.write_text(
                out / CHECKS_FILE,
                json.dumps({"key": checks.key, "checked": checks.checked, "total": checks.total})
                + "\n",
            )
