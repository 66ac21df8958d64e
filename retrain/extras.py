"""The optional extras: whether one is installed, and the one line saying how to install it.

Found without importing the packages (``importlib.util.find_spec``), so a
check costs nothing when the settings are validated.
"""

import importlib.util

from retrain.errors import RetrainError

# --onnx converts with tf2onnx and checks and runs the file with ONNX Runtime: the
# modules of the optional extra [onnx], and how to install them.
ONNX_MODULES = ("onnx", "onnxruntime", "tf2onnx")
ONNX_INSTALL = "pip install 'retrain[onnx]'"


def missing_onnx_modules() -> list[str]:
    """The modules of ONNX_MODULES that are not installed (found without importing them)."""
    return [name for name in ONNX_MODULES if importlib.util.find_spec(name) is None]


def check_onnx_installed(needed_by: str) -> None:
    """RetrainError saying how to install the [onnx] extra when a module of it is missing.

    Called when the settings are checked, so a run with --onnx stops before any work.
    """
    missing = missing_onnx_modules()
    if missing:
        raise RetrainError(
            f"{needed_by} needs the optional ONNX packages ({', '.join(missing)} not installed): "
            f"install them with {ONNX_INSTALL}"
        )
