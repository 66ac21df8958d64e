"""`python -m retrain.report OUTPUT_DIR` (and `retrain-report`): rebuild a run's page.

Rebuilds OUTPUT_DIR/report.html, training_curves.png, confusion_matrix.png and
reliability.png from what a run saved there (retrain.report.page.build);
`--screenshot FILE.png` also renders the page with headless Chromium.
"""

from __future__ import annotations

import argparse
import logging
import sys

from retrain import messages
from retrain.arguments import add_version
from retrain.errors import RetrainError
from retrain.files.text_escapes import one_line
from retrain.report.report_parts import ReportParts

logger = logging.getLogger("retrain.report")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m retrain.report` and the `retrain-report` console script.

    Exit status 0 when the page was written (a missing figure is a warning and
    a "Report incomplete" line on stderr); 2 with one stderr line when the
    folder cannot give a page (no record, a file that is no regular file, too
    large, or not what retrain wrote).
    """
    messages.setup("retrain.report")
    parser = argparse.ArgumentParser(
        prog="python -m retrain.report",
        description="Rebuild report.html and its figures from the output folder of a retrain run.",
    )
    add_version(parser)
    parser.add_argument("output_dir", help="the --output_dir of a finished run")
    parser.add_argument(
        "--screenshot",
        metavar="FILE.png",
        help="also render the page with headless Chromium into this PNG",
    )
    parser.add_argument(
        "--width", type=int, default=1280, help="screenshot width in pixels (default 1280)"
    )
    parser.add_argument(
        "--height", type=int, default=3000, help="screenshot height in pixels (default 3000)"
    )
    args = parser.parse_args(argv)
    # Imported after the arguments: --help and --version need no matplotlib.
    from retrain.report.page import build

    parts = ReportParts()
    try:
        path = build(args.output_dir, parts)
        print(f"Wrote {path}")
        if parts.missing:
            logger.info("%s", parts.line())
        if args.screenshot:
            from retrain.report import page_screenshot

            print(
                f"Wrote {page_screenshot.screenshot(path, args.screenshot, args.width, args.height)}"
            )
    except RetrainError as error:
        logger.error("%s", one_line(str(error)))
        return 2
    except Exception as error:  # noqa: BLE001 - a received folder's content must not give a traceback
        logger.error(
            "cannot rebuild the page in %s: %s: %s. Is it the output folder of a "
            "retrain run, unchanged?",
            one_line(args.output_dir),
            type(error).__name__,
            one_line(str(error)),
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
