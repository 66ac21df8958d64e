"""How retrain speaks to the user: every line on stderr goes through `logging`.

Each command's entry point calls ``setup(prog)`` once. Then the records of
the ``retrain`` loggers print on stderr, one line each:

    ERROR    "<prog>: error: <message>"   bad input; exit status 2 follows
    WARNING  "WARNING: <message>"         a file skipped, a report part missing...
    INFO     "<message>"                  a note ("3 images skipped; listed in ...")

Other libraries' warnings print the same way (unless the host, e.g. a notebook,
already prints them); their INFO records stay hidden.
Results (accuracy, saved paths, labels) go to stdout with ``print``.
"""

from __future__ import annotations

import logging
import sys

# The logger every module's ``logging.getLogger(__name__)`` descends from.
ROOT = "retrain"


class _OneLine(logging.Formatter):
    """The one-line format of each level (see the module docstring)."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"{self.prog}: error: {message}" if self.prog else f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {message}"
        return message


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a notebook or a test may
    have replaced it since ``setup``)."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


def _ours(record: logging.LogRecord) -> bool:
    return record.name == ROOT or record.name.startswith(ROOT + ".")


def setup(prog: str) -> None:
    """Prints log records on stderr in the one-line format, ERROR lines prefixed by ``prog``.

    Safe to call again (another command in the same process): the handler is
    replaced, never added twice.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(_OneLine(prog))
    if root.handlers:
        # The host (a notebook, pytest) prints other libraries' records its own way.
        handler.addFilter(_ours)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger(ROOT).setLevel(logging.INFO)
