"""Inference engines: one interface, ``vectors = engine(pixels)``, two runtimes.

* ``KerasEngine`` (``keras_engine``), the reference: the Keras backbone as a
  traced ``tf.function`` (any batch size; TensorFlow uses a GPU when it has one).
* ``LiteRTEngine`` (``litert``): the same backbone converted once at a fixed
  batch size into a flatbuffer with the weights frozen in, run by
  ai-edge-litert's interpreter with XNNPACK. On a 2-core CPU it is 1.3-3x
  faster than the Keras graph. ``check`` converts it, checks it against Keras
  and remembers the outcome.

This module chooses: ``resolve`` names the engine a run uses without building
it, ``EngineChoice`` carries that choice to whoever builds it (the cache, only
when something must be extracted), and ``build_or_fall_back`` is the one
place where a LiteRT conversion that fails its check falls back to Keras.
``extraction`` runs an engine over image files.

Every engine takes float32 [batch, input_size, input_size, 3] RGB values in
[0, 255] (numpy or tf.Tensor) and returns float32 np.ndarray [batch,
feature_dim]. Engines give slightly different vectors, so the engine's name is
part of the bottleneck cache's identity.
"""

import dataclasses
import logging
from typing import Optional

from retrain import backbones
from retrain.config import ENGINE_NAMES
from retrain.engines.check import (
    LITERT_BATCH,
    TOLERANCE,
    EngineCheckFailed,
    compare,
    converted_engine,
    litert_path,
    read_record,
    record_path,
)
from retrain.engines.keras_engine import KerasEngine
from retrain.engines.litert import LiteRTEngine, runtime_available
from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow

__all__ = [
    "EngineCheckFailed",
    "EngineChoice",
    "KerasEngine",
    "LITERT_BATCH",
    "LiteRTEngine",
    "TOLERANCE",
    "build",
    "build_or_fall_back",
    "choose",
    "compare",
    "gpu_available",
    "resolve",
    "runtime_available",
]

logger = logging.getLogger(__name__)


def gpu_available():
    """True when TensorFlow sees a GPU (it then runs the Keras engine there)."""
    tf = import_tensorflow()
    return bool(tf.config.list_physical_devices("GPU"))


def resolve(requested, backbone_name, weights_file=None):
    """The engine a run uses, "keras" or "litert", decided without building it.

    ``auto`` means Keras when TensorFlow has a GPU, else LiteRT when its
    runtime is installed and its conversion of this backbone has not failed
    its check before, else Keras. An explicit ``litert`` falls back the same
    way, with a warning.
    """
    if requested not in ENGINE_NAMES:
        raise RetrainError(
            f"engine must be one of {', '.join(ENGINE_NAMES)}. Received: engine={requested!r}"
        )
    if requested == "keras" or (requested == "auto" and gpu_available()):
        return "keras"
    if not runtime_available():
        _fall_back(requested, "the ai-edge-litert runtime is not installed")
        return "keras"
    path = litert_path(backbone_name, weights_file)
    record = read_record(path)
    if record is not None and not record.get("passed"):
        _fall_back(
            requested,
            f"its conversion failed the check against Keras "
            f"({record.get('reason')}); delete {record_path(path)} "
            "to convert again",
        )
        return "keras"
    return "litert"


def _fall_back(requested, why):
    if requested == "litert":
        logger.warning("using the Keras engine instead of LiteRT: %s", why)


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    """Which engine makes a backbone's vectors, decided before it is built.

    ``name``: "keras" or "litert" (``resolve``); it names the cache file.
    ``build_or_fall_back(choice)`` builds it.
    """

    name: str
    backbone_name: str
    weights_file: Optional[str] = None


def choose(requested, backbone_name, weights_file=None):
    """``resolve`` as an EngineChoice (``requested``: "auto", "keras" or "litert")."""
    return EngineChoice(
        resolve(requested, backbone_name, weights_file), backbone_name, weights_file
    )


def build_or_fall_back(choice, model=None, check_paths=()):
    """The engine of ``choice``; Keras, with a warning, when LiteRT fails its check.

    The engine's ``name`` says which was built (the cache switches files when
    it is not ``choice.name``). ``model`` and ``check_paths``: as for ``build``.
    """
    try:
        return build(choice.name, choice.backbone_name, choice.weights_file, model, check_paths)
    except EngineCheckFailed as error:
        logger.warning("%s", error)
        return build("keras", choice.backbone_name, choice.weights_file, model)


def build(name, backbone_name, weights_file=None, model=None, check_paths=()):
    """The engine ``name`` ("keras" or "litert", see ``resolve``) for a backbone.

    ``model``: the Keras backbone if the caller has it (else it is built when
    needed: always for Keras, for LiteRT only to convert). ``check_paths``:
    image files to check a new conversion on (the run's own photos), used
    with scikit-image's sample photos when that package is installed.
    Raises EngineCheckFailed when a new LiteRT conversion fails or does not
    reproduce the Keras vectors; the failure is recorded, so ``resolve``
    chooses Keras from then on.
    """
    spec = backbones.get(backbone_name)
    if name == "keras":
        if model is None:
            model = backbones.load(spec.name, include_top=False, weights_file=weights_file)
        return KerasEngine(model, spec.input_size)
    if name != "litert":
        raise RetrainError(f"engine must be keras or litert. Received: name={name!r}")
    return converted_engine(spec, weights_file, model, check_paths)
