"""The parts of a run's report, and what to say when some could not be made.

The trained model is the product, the report secondary: a failure while
computing the data checks, writing their CSVs, the thumbnails, a figure or
the page is one warning naming the part, and the run says at its end which
parts are missing ("Report incomplete: ...").
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from retrain.files.text_escapes import one_line

logger = logging.getLogger(__name__)


class ReportParts:
    """The parts of a report that could not be made, each with its reason.

    The model is the product and the report secondary: `part(name)` turns any
    failure inside it (every Exception; KeyboardInterrupt and SystemExit
    still end the run) into one warning line naming the part, and remembers
    it, so the run goes on and can say at the end what is missing.
    """

    def __init__(self):
        self.missing: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def part(self, name: str):
        try:
            yield
        except Exception as error:  # noqa: BLE001 - any failure of a report part is a warning
            reason = one_line(f"{type(error).__name__}: {error}")
            logger.warning("Report: %s not written (%s); the run goes on without it.", name, reason)
            self.missing.append((name, reason))

    def line(self) -> str:
        """ "Report incomplete: X missing (reason); ..." or "" when nothing is missing."""
        if not self.missing:
            return ""
        return "Report incomplete: " + "; ".join(
            f"{name} missing ({reason})" for name, reason in self.missing
        )


@dataclass
class ReportOutcome:
    """What `write_run_report` made: the page (None if it could not be written), the
    data checks (None if they failed) and the parts that are missing."""

    page: Path | None
    checks: object  # retrain.report.DataChecks, or None
    parts: ReportParts = field(default_factory=ReportParts)
