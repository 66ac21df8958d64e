"""Import TensorFlow without its start-up noise on stderr.

TensorFlow 2.21 writes INFO lines from C++ before absl logging is initialised
("All log messages before absl::InitializeLog() ...", cudart_stub, oneDNN, a
cuInit error on machines without a GPU), and TF_CPP_MIN_LOG_LEVEL does not
silence them (tensorflow/tensorflow#102212). A command-line user must see only
our own warnings and errors on stderr, so the commands import TensorFlow here:
file descriptor 2 is captured during the import and the first device query,
and every captured line that is not known start-up noise is written back.
`captured_output` is that capture, for other chatty calls (the TFLite
converter and interpreter).

Importing TensorFlow imports Keras, and Keras 3.15 imports scikit-learn
(keras.wrappers), pandas (its array slicing) and matplotlib.pyplot
(keras.visualization) whenever they are installed: 1.5-2.5 s of a 3.5-7 s
import on a 2-core machine (docs/benchmarks.md, "Start-up"). retrain never
uses those Keras integrations, so its commands import TensorFlow with
``keras_extras=False``: Keras sees the three as not installed, as it would
in a leaner environment, and retrain imports them itself when a stage uses
them (the metrics, the report).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

STARTUP_NOISE = (
    "All log messages before absl::InitializeLog()",
    "cudart_stub.cc",
    "port.cc:",
    "cuda_platform.cc",
    "cpu_feature_guard.cc",
    "This TensorFlow binary is optimized",
    "To enable the following instructions",
)


# Libraries Keras imports at start-up only for integrations retrain does not use.
KERAS_EXTRAS = ("sklearn", "pandas", "matplotlib")


def import_tensorflow(keras_extras: bool = True):
    """Import and return the tensorflow module, dropping only its start-up noise.

    keras_extras=False: Keras is imported as if scikit-learn, pandas and
    matplotlib were not installed (its scikit-learn wrappers, DataFrame input
    and plotting helpers then say so if called), unless one of them is
    already imported. For commands, which own their process; a library
    caller keeps the default. The libraries stay importable afterwards.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    text = ""
    try:
        with captured_output(2) as captured, _hidden(() if keras_extras else KERAS_EXTRAS):
            try:
                import tensorflow as tf

                tf.config.list_physical_devices()  # the cuInit message comes here, not at import
            finally:
                text = captured()
    finally:
        sys.stderr.write(
            "".join(
                line
                for line in text.splitlines(keepends=True)
                if not any(noise in line for noise in STARTUP_NOISE)
            )
        )
    return tf


@contextlib.contextmanager
def _hidden(names):
    """Within the block, `import <name>` of a module in `names` not yet imported raises
    ImportError (a None entry in sys.modules); afterwards it imports as usual."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


@contextlib.contextmanager
def captured_output(*fds):
    """Sends file descriptors `fds` (1 stdout, 2 stderr) to a temporary file for the block.

    Catches what C++ code and Python print alike (TFLite's converter and
    interpreter log there). Yields a function returning the text captured so far.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as capture:
        saved = [os.dup(fd) for fd in fds]
        for fd in fds:
            os.dup2(capture.fileno(), fd)

        def text():
            sys.stdout.flush()
            sys.stderr.flush()
            capture.seek(0)
            return capture.read().decode(errors="replace")

        try:
            yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip(fds, saved):
                os.dup2(copy, fd)
                os.close(copy)
