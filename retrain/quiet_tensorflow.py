"""Import TensorFlow without its start-up noise on stderr.

TensorFlow 2.21 writes INFO lines from C++ before absl logging is initialised
("All log messages before absl::InitializeLog() ...", cudart_stub, oneDNN, a
cuInit error on machines without a GPU), and TF_CPP_MIN_LOG_LEVEL does not
silence them (tensorflow/tensorflow#102212). A command-line user must see only
our own warnings and errors on stderr, so the commands import TensorFlow here:
file descriptor 2 is captured during the import and the first device query,
and every captured line that is not known start-up noise is written back.
"""

from __future__ import annotations

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


def import_tensorflow():
    """Import and return the tensorflow module, dropping only its start-up noise."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the cuInit message comes here, not at import
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(noise in line for noise in STARTUP_NOISE)]
            sys.stderr.write("".join(kept))
    return tf
