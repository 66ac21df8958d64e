"""The argument parser every retrain command uses: a usage error is one stderr line.

Shared by `retrain.cli` (training), `retrain.label_image` and `retrain.beam`,
so the inference command need not import the training command line.
"""

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one stderr line: the full usage of ~20 flags buries the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
