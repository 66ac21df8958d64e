"""How retrain speaks to the user: every line on stderr goes through `logging`.

Records of the ``retrain`` loggers print on stderr, one line each:

    ERROR    "<prog>: error: <message>"   bad input; exit status 2 follows
    WARNING  "WARNING: <message>"         a file skipped, a report part missing...
    INFO     "<message>"                  a note ("3 images skipped; listed in ...")

Notes (INFO) always print, from the command line or a notebook alike. Each
command's entry point calls ``setup(prog)`` once, which prints the warnings
and errors of retrain and the warnings of other libraries, unless the host
(a notebook or test runner that configured ``logging``) already handles
them; its error lines still print. Without ``setup`` and without any logging
configuration, retrain's warnings print too.
Results (accuracy, saved paths, labels) go to stdout with ``print``.
"""

from __future__ import annotations

import logging
import sys

# The logger every module's ``logging.getLogger(__name__)`` descends from.
ROOT = "retrain"


class _OneLine(logging.Formatter):
    """The one-line format of each level (see the module docstring)."""

    def __init__(self, prog: str = ""):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"{self.prog}: error: {message}" if self.prog else f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {message}"
        return message


class _Stderr(logging.Handler):
    """Writes each record as one line to whatever ``sys.stderr`` is when it comes (a
    notebook or a test may have replaced it since the handler was made)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own convention for a failing handler
            self.handleError(record)


def _ours(record: logging.LogRecord) -> bool:
    return record.name == ROOT or record.name.startswith(ROOT + ".")


def _note_or_unhandled(record: logging.LogRecord) -> bool:
    """Notes always; warnings and errors only when nothing else would show them."""
    return record.levelno < logging.WARNING or not logging.getLogger().handlers


def _install_notes() -> None:
    logger = logging.getLogger(ROOT)
    if not any(isinstance(handler, _Stderr) for handler in logger.handlers):
        notes = _Stderr()
        notes.setFormatter(_OneLine())
        notes.addFilter(_note_or_unhandled)
        logger.addHandler(notes)
    logger.setLevel(logging.INFO)


def setup(prog: str) -> None:
    """Prints warnings and errors on stderr, error lines prefixed by ``prog``.

    Safe to call again (another command in the same process): the handler is
    replaced, never added twice.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(handler)
    hosted = bool(root.handlers)
    handler = _Stderr()
    handler.setFormatter(_OneLine(prog))
    if hosted:
        # The host shows warnings its own way; the command's error lines are ours to print.
        handler.addFilter(lambda record: record.levelno >= logging.ERROR and _ours(record))
    else:
        handler.addFilter(lambda record: record.levelno >= logging.WARNING)
    root.addHandler(handler)


_install_notes()
