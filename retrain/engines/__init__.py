"""Inference engines: one interface, ``vectors = engine(pixels)``, two runtimes, three engines.

* ``KerasEngine`` (``keras_engine``), the reference: the Keras backbone as a
  traced ``tf.function`` (any batch size; TensorFlow uses a GPU when it has one).
* ``LiteRTEngine`` (``litert``): the same backbone converted once at a fixed
  batch size into a flatbuffer with the weights frozen in, run by
  ai-edge-litert's interpreter with XNNPACK. On a 2-core CPU it is 1.3-3x
  faster than the Keras graph. ``check`` converts it, checks it against Keras
  and remembers the outcome.
* The int8 LiteRT engine (``int8``, ``--engine litert-int8``): the backbone
  fully quantized, calibrated on a fixed, versioned set of scikit-image's
  photos; about 1.6x float LiteRT on CPUs with VNNI, its vectors within a
  cosine floor of Keras's.

This module chooses: ``resolve`` names the engine a run uses without building
it, ``EngineChoice`` carries that choice to whoever builds it (the cache, only
when something must be extracted), and ``build_or_fall_back`` is the one
place where a conversion that fails its check falls back (int8 to float
LiteRT, LiteRT to Keras).
``extraction`` runs an engine over image files.

Every engine takes float32 or uint8 [batch, input_size, input_size, 3] RGB values in
[0, 255] (numpy or tf.Tensor) and returns float32 np.ndarray [batch,
feature_dim]. Engines give slightly different vectors, so the engine's name is
part of the bottleneck cache's identity.
"""

import dataclasses
import logging
from typing import Optional

from retrain import backbones
from retrain.config import ENGINE_NAMES
from retrain.engines import int8
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
    "identity_name",
    "resolve",
    "runtime_available",
]

logger = logging.getLogger(__name__)

# The engines that can be built, each falling back to the next when its conversion
# fails its check.
FALLBACKS = (int8.ENGINE, "litert", "keras")


def gpu_available():
    """True when TensorFlow sees a GPU (it then runs the Keras engine there)."""
    tf = import_tensorflow()
    return bool(tf.config.list_physical_devices("GPU"))


def resolve(requested, backbone_name, weights_file=None):
    """The engine a run uses, "keras", "litert" or "litert-int8", decided without building it.

    ``auto`` means Keras when TensorFlow has a GPU, else LiteRT (float32) when
    its runtime is installed and its conversion of this backbone has not
    failed its check before, else Keras. An explicit ``litert`` falls back the
    same way, with a warning; ``litert-int8`` falls back to float LiteRT
    (then Keras) when its own conversion failed its check before.
    """
    if requested not in ENGINE_NAMES:
        raise RetrainError(
            f"engine must be one of {', '.join(ENGINE_NAMES)}. Received: engine={requested!r}"
        )
    if requested == "keras" or (requested == "auto" and gpu_available()):
        return "keras"
    if not runtime_available():
        _fall_back(requested, "keras", "the ai-edge-litert runtime is not installed")
        return "keras"
    if requested == int8.ENGINE:
        why = _failed_before(backbone_name, weights_file, int8.ENGINE)
        if why is None:
            return int8.ENGINE
        _fall_back(requested, "litert", why)
    why = _failed_before(backbone_name, weights_file, "litert")
    if why is not None:
        _fall_back(requested, "keras", why)
        return "keras"
    return "litert"


def _failed_before(backbone_name, weights_file, name):
    """Why the kept conversion ``name`` of this backbone failed its check, or None."""
    path = litert_path(backbone_name, weights_file, name)
    record = read_record(path)
    if record is None or record.get("passed"):
        return None
    return (
        f"its conversion failed the check against Keras ({record.get('reason')}); "
        f"delete {record_path(path)} to convert again"
    )


def _fall_back(requested, instead, why):
    if requested != "auto":
        logger.warning("using the %s engine instead of %s: %s", instead, requested, why)


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
    """The engine of ``choice``, or the next one down, with a warning, when a conversion
    fails its check: litert-int8 -> litert -> keras.

    The engine's ``name`` says which was built (the cache switches files when
    it is not ``choice.name``). ``model`` and ``check_paths``: as for ``build``.
    """
    names = FALLBACKS[FALLBACKS.index(choice.name) :]
    for name in names[:-1]:
        try:
            return build(name, choice.backbone_name, choice.weights_file, model, check_paths)
        except EngineCheckFailed as error:
            logger.warning("%s", error)
    return build(names[-1], choice.backbone_name, choice.weights_file, model, check_paths)


def identity_name(name):
    """An engine's name in the bottleneck cache's identity: the int8 engine's carries its
    calibration set's version (another set makes other vectors)."""
    return int8.identity_name() if name == int8.ENGINE else name


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
    if name not in FALLBACKS:
        raise RetrainError(f"engine must be one of {', '.join(FALLBACKS)}. Received: name={name!r}")
    return converted_engine(spec, weights_file, model, check_paths, name)
