"""The command-line edge every retrain command shares: its argument parser and its exit.

`OneLineErrorParser` makes a usage error one stderr line; `add_version` adds the
`--version` flag every command takes; `at_least` parses a bounded integer;
`exit_without_teardown`
ends a command's process without Python's slow teardown of TensorFlow.
Shared by `retrain.cli` (training), `retrain.label_image` and `retrain.beam`,
so the inference command need not import the training command line.
"""

import argparse
import atexit
import logging
import os
import sys


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: prints "retrain X.Y.Z" on stdout and exits 0, before TensorFlow is imported."""
    from retrain import __version__

    parser.add_argument(
        "--version", action="version", version=f"retrain {__version__}", help="print the version"
    )


def at_least(minimum: int, what: str):
    """An argparse `type`: the text as an int of at least `minimum`, else a usage error
    saying the value must be `what` (e.g. "a positive integer")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}. Received: {text!r}")
        return value

    return parse


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one stderr line: the full usage of ~20 flags buries the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def exit_without_teardown(status: int) -> None:
    """Ends the process with `status` once stdio, logging and atexit handlers are done.

    Python's own teardown of TensorFlow's and Keras's modules adds 5-10 s to
    every run on a 2-core machine (measured: 4.9 s, against 0.3 s without
    it), a tenth of a warm rerun and most of labelling one picture. Every
    file a command writes is closed and fsynced before it returns, and the
    atexit handlers (TensorFlow's, logging's) still run here; only module
    teardown and garbage collection are skipped. Not for library use: it
    ends the process.
    """
    logging.shutdown()
    atexit._run_exitfuncs()  # the handlers os._exit would skip
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
