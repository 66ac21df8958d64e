"""A PNG screenshot of an HTML page from headless Chromium, to look at a report without a browser.

Used by `python -m retrain.report OUTPUT_DIR --screenshot FILE.png` (and so by
`make report-screenshot`) and by the report tests. Chromium is optional: Debian
and Ubuntu ship it as `chromium`, others as `chromium-browser` or
`google-chrome`; `find_chromium` returns None when none is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from retrain.errors import RetrainError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# No network, no first-run UI, no background services, a throw-away profile:
# the page must render from disk alone. --no-sandbox because CI and containers
# often run as root, where Chromium's sandbox refuses to start.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",
)
TIMEOUT_SECONDS = 120


def find_chromium() -> str | None:
    """The path of a Chromium or Chrome executable ($CHROMIUM first), or None."""
    candidates = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else []
    for name in candidates + list(CHROMIUM_NAMES):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(page, png, width: int = 1280, height: int = 3000) -> Path:
    """Renders the HTML file `page` at width x height CSS pixels into `png`; returns its path.

    Raises:
      RetrainError when no Chromium is installed or it fails, with its last stderr line.
    """
    chromium = find_chromium()
    if chromium is None:
        raise RetrainError(
            "Taking a screenshot needs Chromium: install it (Debian/Ubuntu: "
            "apt-get install chromium) or set CHROMIUM to its path."
        )
    page, png = Path(page).resolve(), Path(png).resolve()
    if not page.is_file():
        raise RetrainError(f"No page to render. Received: page={page}")
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="retrain-chromium-") as profile:
        command = [
            chromium,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            page.as_uri(),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            raise RetrainError(
                f"Chromium did not finish within {TIMEOUT_SECONDS} s. Received: page={page}"
            ) from None
    if done.returncode != 0 or not png.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RetrainError(
            f"Chromium could not render {page} (exit status {done.returncode}): {last}"
        )
    return png
