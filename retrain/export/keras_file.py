"""Loading a .keras file that may come from anyone, running no code from it.

`load_classifier` copies the file once into a private folder, checks that copy
(`check_model_archive`: a zip of exactly what Keras 3 writes, within size
bounds; `check_model_config`: only the layers and objects retrain's exports
hold) and only then lets Keras load it in safe mode, on a Keras with the
published safe-mode fixes (`MIN_KERAS`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path

from retrain.errors import RetrainError
from retrain.files import regular_file
from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)


def load_classifier(path) -> keras.Model:
    """Loads a model written by `save_classifier`, without compiling it and running no code from it.

    The file may come from anyone, so it is copied once into a private folder
    (the file checked is the file loaded) and refused unless it is a `.keras`
    zip archive holding exactly what Keras 3 writes, within size bounds, whose
    config.json names only the layers and objects retrain's exports contain
    (see `check_model_config`). Only then does Keras load it, with safe mode
    on, on a Keras with the published safe-mode fixes (`MIN_KERAS`).

    Returns:
      keras.Model: float32 [batch, height, width, 3] RGB in [0, 255] ->
      float32 [batch, num_classes] probabilities (see `build_classifier`).

    Raises:
      RetrainError naming the file if it is missing, not a regular file, a
      legacy HDF5 (.h5) model, not such an archive, holds anything outside
      the allowlist (a Lambda layer, a custom object...) or does not load.
    """
    path = Path(path)
    _check_keras_version()
    with tempfile.TemporaryDirectory(prefix="retrain-model-") as folder:
        copy = _private_copy(path, Path(folder) / "model.keras")
        check_model_archive(copy, shown_as=path)
        try:
            return keras.saving.load_model(copy, compile=False, safe_mode=True)
        except Exception as error:  # noqa: BLE001  (zip, HDF5, JSON and Keras errors all mean "unusable")
            raise RetrainError(
                f"Cannot load model {path}: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no details'}. "
                "Re-export it with a retrain run."
            ) from None


# Keras releases that fixed ways around safe mode or out of the model file:
# CVE-2025-1550 (3.9.0), CVE-2025-8747 and CVE-2025-9906 (3.11.0),
# CVE-2025-9905 (3.11.3), CVE-2025-12058 and CVE-2025-12060 (3.12.0),
# CVE-2026-0897 (3.12.1/3.13.1), CVE-2026-1669 (HDF5 external datasets) and
# CVE-2026-1462 (TFSMLayer, 3.13.2), GHSA-hqp4-2352-xf5r (3.14.0), then 3.15.1's
# H5 group checks and decompression-bomb refusal. setup.cfg pins the same.
MIN_KERAS = (3, 15, 1)
# Bounds checked from the zip's headers before anything is decompressed.
# retrain's largest config.json (InceptionV3) is 0.3 MB; its largest export
# (ResNet50) 95 MB, plus a head of feature_dim x classes floats.
MAX_CONFIG_BYTES = 16 * 2**20
MAX_METADATA_BYTES = 2**16
MAX_MODEL_BYTES = 2 * 2**30
KERAS_MEMBERS = ("config.json", "metadata.json", "model.weights.h5")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Every (module, class_name) a retrain export holds, with every backbone of
# `retrain.backbones` and the trained head's compile config (which Keras
# deserializes even with compile=False); None: the tensors of the graph.
# Permute and Average: the test-time flip (`retrain.export.classifier.mirror`);
# Identity: the bottleneck vector the unknown score reads.
ALLOWED_CLASSES = {
    "keras": {"DTypePolicy", "Sequential"},
    "keras.src.models.functional": {"Functional"},
    "keras.layers": {
        "Activation",
        "Add",
        "Average",
        "AveragePooling2D",
        "BatchNormalization",
        "Concatenate",
        "Conv2D",
        "Dense",
        "DepthwiseConv2D",
        "GlobalAveragePooling2D",
        "Identity",
        "InputLayer",
        "MaxPooling2D",
        "Permute",
        "ReLU",
        "Rescaling",
        "Resizing",
        "ZeroPadding2D",
    },
    "keras.initializers": {"GlorotUniform", "Ones", "Zeros"},
    "keras.regularizers": {"L2"},
    "keras.optimizers": {"Adam"},
    "keras.optimizers.schedules": {"CosineDecay"},
    None: {"__keras_tensor__"},
}
# Activations are named by strings, which Keras would also look up among
# registered custom objects.
ALLOWED_ACTIVATIONS = {"linear", "relu", "relu6", "softmax"}
MAX_CONFIG_DEPTH = 64  # retrain's configs nest about 12 deep


def _check_keras_version():
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", keras.__version__)
    if found is None or tuple(map(int, found.groups())) < MIN_KERAS:
        wanted = ".".join(map(str, MIN_KERAS))
        raise RetrainError(
            f"Keras {keras.__version__} lacks the fixes for model files that run code "
            f"despite safe mode: upgrade with pip install 'keras>={wanted}'."
        )


def _private_copy(path: Path, target: Path) -> Path:
    """Copies the regular file `path` (at most MAX_MODEL_BYTES) to `target`, opened once.

    A FIFO, device or socket is refused without being opened for reading
    (O_NONBLOCK: a FIFO swapped in after the stat cannot block the open).
    """
    try:
        # Checked by path first too: a socket would fail to open (ENXIO) with a vaguer message.
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):
            raise RetrainError(
                f"Model {path} is not a regular file: pass the model.keras file "
                f"written by a retrain run. Received: path={path}"
            )
        with regular_file.open_regular(path, follow_symlinks=True, limit=MAX_MODEL_BYTES) as (
            source,
            status,
        ):
            with open(target, "xb") as copy:
                shutil.copyfileobj(source, copy)
                if copy.tell() != status.st_size:
                    raise RetrainError(
                        f"Model {path} changed while it was read: pass a file "
                        f"nothing else is writing. Received: path={path}"
                    )
    except regular_file.RefusedFile as refused:  # the file opened, whatever the path now names
        raise RetrainError(
            f"Model {path} is not a regular file of at most "
            f"{MAX_MODEL_BYTES // 2**20} MB, as retrain's exports are. "
            f"Received: path={path}, size={refused.status.st_size}"
        ) from None
    except FileNotFoundError:
        raise RetrainError(
            f"Model file not found: {path}. Pass the .keras file written by a "
            f"retrain run (default output/model.keras). Received: path={path}"
        ) from None
    except OSError as error:
        raise RetrainError(f"Cannot read model {path}: {error.strerror or error}.") from None
    return target


def check_model_archive(path, shown_as=None) -> None:
    """Raises RetrainError unless `path` is a .keras zip holding only what retrain exports.

    Checked before Keras opens the file: the name ends in .keras; not an HDF5
    file; a zip whose members are exactly `KERAS_MEMBERS`, with the sizes
    their headers declare (zipfile reads no byte past them) within
    `MAX_CONFIG_BYTES`, `MAX_METADATA_BYTES` and `MAX_MODEL_BYTES` in total;
    JSON config and metadata; and a config that passes `check_model_config`.
    `shown_as` is the name used in messages (default `path`).
    """
    shown = Path(shown_as if shown_as is not None else path)

    def refuse(reason):
        # The reason quotes names from the file: escaped and cut, so it stays one short line.
        reason = "".join(c if c.isprintable() else repr(c)[1:-1] for c in reason[:300])
        raise RetrainError(
            f"Refusing model {shown}: {reason}. Only .keras files exported by "
            "retrain are loaded: re-export the model with a retrain run."
        )

    with open(path, "rb") as handle:
        if handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            refuse("it is a legacy HDF5 (.h5) Keras model, a format whose loading can run code")
    if shown.suffix != ".keras":
        refuse("its name does not end in .keras")
    if not zipfile.is_zipfile(path):
        refuse("it is not a .keras zip archive")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if len(members) != len(archive.infolist()) or sorted(members) != sorted(KERAS_MEMBERS):
                refuse(
                    f"the archive holds {sorted(archive.namelist())}, not exactly "
                    f"{list(KERAS_MEMBERS)}"
                )
            sizes = {name: info.file_size for name, info in members.items()}
            for name, limit in (
                ("config.json", MAX_CONFIG_BYTES),
                ("metadata.json", MAX_METADATA_BYTES),
            ):
                if sizes[name] > limit:
                    refuse(f"its {name} expands to {sizes[name]} bytes (at most {limit})")
            if sum(sizes.values()) > MAX_MODEL_BYTES:
                refuse(f"it expands to {sum(sizes.values())} bytes (at most {MAX_MODEL_BYTES})")
            config = json.loads(archive.read("config.json"))
            json.loads(archive.read("metadata.json"))
    except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError, zlib.error) as error:
        refuse(f"its zip archive is damaged ({error})")
    except (UnicodeDecodeError, ValueError, RecursionError):
        refuse("its config.json or metadata.json is not JSON")
    reason = check_model_config(config)
    if reason:
        refuse(reason)


def check_model_config(config, depth=0) -> str | None:
    """Why a model's config.json is refused, or None when every object in it is allowed.

    Walks the whole config (nested models, layer configs, the compile configs
    Keras deserializes): every object is a `(module, class_name)` of
    `ALLOWED_CLASSES` whose `registered_name` is empty or its class name, and
    every activation one of `ALLOWED_ACTIVATIONS`. So no Lambda (Python code),
    no custom object and no class from elsewhere (os.system, keras.utils.get_file,
    keras.config.enable_unsafe_deserialization, TFSMLayer...) reaches Keras.
    """
    if depth > MAX_CONFIG_DEPTH:
        return f"its config.json nests deeper than {MAX_CONFIG_DEPTH} levels"
    if isinstance(config, dict):
        reason = _refused_object(config)
        children = config.values()
    else:
        reason, children = None, config if isinstance(config, list) else ()
    for child in children:
        reason = reason or check_model_config(child, depth + 1)
    return reason


def _refused_object(node: dict) -> str | None:
    activation = node.get("activation")
    if activation is not None and (
        not isinstance(activation, str) or activation not in ALLOWED_ACTIVATIONS
    ):
        return f"it uses the activation {activation!r}, not one of {sorted(ALLOWED_ACTIVATIONS)}"
    if "class_name" not in node:
        return None
    class_name, module = node["class_name"], node.get("module")
    if class_name in ("Lambda", "__lambda__"):
        return (
            f"it holds a Lambda layer {node.get('name', '')!r}, Python code that loading would run"
        )
    allowed = ALLOWED_CLASSES.get(module, ()) if isinstance(module, (str, type(None))) else ()
    if not isinstance(class_name, str) or class_name not in allowed:
        return (
            f"its config.json names {module}.{class_name}, which retrain's exports never hold "
            "(custom objects and classes outside keras' built-in layers are refused)"
        )
    if node.get("registered_name") not in (None, class_name):
        return (
            f"its config.json registers {class_name} as {node['registered_name']!r}, "
            "a custom object"
        )
    return None
