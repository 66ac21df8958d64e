"""python -m retrain.backbones --describe [NAME] [--time]

Prints each backbone's spec and fingerprint; with --time, also how long
loading NAME takes with a cold and with a warm conversion cache (measured in
a temporary RETRAIN_HOME, so the user's cache is left alone). Bad input
prints one line on stderr and exits with status 2.
"""

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time

from retrain import backbones, messages
from retrain.errors import RetrainError

logger = logging.getLogger("retrain.backbones")


def main(argv=None):
    messages.setup("")
    parser = argparse.ArgumentParser(prog="python -m retrain.backbones")
    parser.add_argument(
        "--describe",
        nargs="?",
        const="",
        metavar="NAME",
        required=True,
        help="print the spec and fingerprint of NAME (default: every backbone)",
    )
    parser.add_argument(
        "--time",
        action="store_true",
        help="also time loading NAME with a cold and a warm conversion cache",
    )
    parser.add_argument("--repeats", type=int, default=5, help="warm loads to time (median shown)")
    args = parser.parse_args(argv)
    if args.describe and args.describe not in backbones.BACKBONES:
        parser.error(
            f"unknown backbone {args.describe!r}; choose one of: {', '.join(backbones.names())}"
        )
    if args.time and not args.describe:
        parser.error("--time needs a backbone name: --describe NAME --time")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1. Received: --repeats={args.repeats}")
    try:
        for name in [args.describe] if args.describe else backbones.names():
            describe(name)
        if args.time:
            time_loads(args.describe, args.repeats)
    except RetrainError as error:
        logger.error("%s", error)
        return 2
    return 0


def describe(name):
    spec = backbones.get(name)
    print(name)
    for field in dataclasses.fields(spec):
        print(f"  {field.name}: {getattr(spec, field.name)}")
    print(f"  fingerprint: {backbones.fingerprint(name)}")


def time_loads(name, repeats):
    started = time.perf_counter()
    import keras  # noqa: F401  (timed apart: every load pays it once per process)

    print(f"import keras: {time.perf_counter() - started:.2f} s")
    previous = os.environ.get("RETRAIN_HOME")
    with tempfile.TemporaryDirectory() as home:
        os.environ["RETRAIN_HOME"] = home
        try:
            cold = _seconds(lambda: backbones.load(name))
            warm = [_seconds(lambda: backbones.load(name)) for _ in range(repeats)]
        finally:
            if previous is None:
                del os.environ["RETRAIN_HOME"]
            else:
                os.environ["RETRAIN_HOME"] = previous
    print(f"cold load (empty conversion cache): {cold:.3f} s")
    print(f"warm load (median of {repeats}): {statistics.median(warm):.3f} s")


def _seconds(function):
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
