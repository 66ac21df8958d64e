"""What a run prints for the user: the one-line summaries on stdout, the skipped images on stderr.

Results go to stdout through `result`; notes about images the run could not
use go to stderr. `shown(results=False, progress=False)` silences the results
and progress bars of the code it wraps (`retrain.train` unless asked) in that
thread only: context variables, not a swap of sys.stdout, so prints of other
threads (a notebook's own) still show.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from retrain.files.text_escapes import one_line

if TYPE_CHECKING:  # an annotation only: the results seam imports no stage
    from retrain.cache import CacheReport

logger = logging.getLogger(__name__)

# Skipped images a --cache_only run names one by one on stderr.
SHOWN_SKIPPED = 5
# What the user sees of a run in this context: its results on stdout, its progress
# bars on stderr. True unless inside `shown(...)` saying otherwise.
_RESULTS_SHOWN = contextvars.ContextVar("retrain_results_shown", default=True)
_PROGRESS_SHOWN = contextvars.ContextVar("retrain_progress_shown", default=True)


def result(line: str) -> None:
    """Prints one result line (accuracy, saved paths...) on stdout, unless silenced here."""
    if _RESULTS_SHOWN.get():
        print(line, flush=True)


def progress_bars() -> bool:
    """Whether the stages started in this context show progress bars (on stderr)."""
    return _PROGRESS_SHOWN.get()


@contextlib.contextmanager
def shown(*, results: bool = True, progress: bool = True):
    """Within the block, `result` prints only if `results`, and `progress_bars()` is `progress`.

    Context variables: only the calling thread (and tasks it starts with its
    context) is affected, never another thread's prints.
    """
    tokens = (_RESULTS_SHOWN.set(results), _PROGRESS_SHOWN.set(progress))
    try:
        yield
    finally:
        _PROGRESS_SHOWN.reset(tokens[1])
        _RESULTS_SHOWN.reset(tokens[0])


def cache_summary(report: CacheReport, skipped: int) -> str:
    """The run's one line about the cache: extracted (with the rate), reused, skipped, merged."""
    merged = f" ({report.merged} shard files merged)" if report.merged else ""
    rate = ""
    if report.extracted and report.extract_seconds > 0:
        rate = (
            f" ({report.extracted / report.extract_seconds:.1f} images/s, {report.engine} engine)"
        )
    return (
        f"Bottleneck cache {report.path}: {report.extracted} extracted{rate}, "
        f"{report.reused} reused, {skipped} skipped{merged}."
    )


def shard_summary(report: CacheReport, num_shards: int, shard_index: int) -> str:
    """The one line of a --num_shards run: what this shard extracted and where it went."""
    return (
        f"Shard {shard_index} of {num_shards}: {report.extracted} extracted, "
        f"{report.reused} already cached, {len(report.failed)} failed; wrote "
        f"{len(report.shard_files)} shard file(s) beside {report.path}. The next run without "
        "--num_shards merges them."
    )


def print_skipped_count(skipped: list, listing: Path) -> None:
    """A training run's note on stderr: how many images were skipped, and the file listing them."""
    if skipped:
        logger.info("%d images skipped; listed in %s", len(skipped), listing)


def print_skipped_images(skipped: list) -> None:
    """A --cache_only run's note on stderr: the first SHOWN_SKIPPED skipped images and why."""
    for path, reason in skipped[:SHOWN_SKIPPED]:
        logger.info("skipped %s: %s", one_line(path), one_line(str(reason)))
    if len(skipped) > SHOWN_SKIPPED:
        logger.info(
            "... and %d more images skipped; a training run lists them all in skipped_images.txt",
            len(skipped) - SHOWN_SKIPPED,
        )


def print_report_outcome(outcome, final_folder: Path) -> None:
    """The report's lines: the data checks' summary and the page on stdout, missing parts on stderr."""
    from retrain import report  # deferred: matplotlib and Jinja2

    if outcome.checks is not None:
        result(report.checks_summary(outcome.checks))
    if outcome.page is not None:
        result(f"Report: {final_folder / outcome.page.name}")
    if outcome.parts.missing:
        logger.info("%s", outcome.parts.line())


def write_skipped(skipped, path: Path) -> None:
    """List every image the run could not use, one `path<TAB>reason` line each (none: no file).

    Paths and reasons as `text_escapes.one_line`, the escapes of every file a run writes.
    """
    if skipped:
        path.write_text(
            "".join(f"{one_line(rel)}\t{one_line(str(reason))}\n" for rel, reason in skipped),
            encoding="utf-8",
        )
