"""One place for the settings of a run: defaults < YAML file < command line.

`Config` holds every setting with its default. `load_yaml` reads a YAML mapping
and refuses keys that are not fields (a typo must not be silently ignored).
`validate` checks values with `check_setting`, which the library functions
taking the same settings as arguments call too; `save_yaml` writes the
resolved settings beside the outputs so every output folder says exactly what
produced it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from retrain.errors import RetrainError
from retrain.extras import check_onnx_installed
from retrain.files import atomic_write, run_marker

# The TFLite exports --tflite can write, each to OUTPUT_DIR/model_<kind>.tflite.
TFLITE_KINDS = ("float32", "float16", "int8")
# The backbone of a run that names none (a key of retrain.backbones.BACKBONES).
DEFAULT_BACKBONE = "efficientnet_lite0"
# --engine: "auto" lets retrain.engines.resolve pick keras or litert.
ENGINE_NAMES = ("auto", "keras", "litert", "litert-int8")
# --preset: the groups of defaults retrain.presets defines.
PRESET_NAMES = ("fast", "best")


@dataclass
class Config:
    """Every setting of a run, with retrain.py's names where they apply.

    The fields a preset sets (`retrain.presets.PRESETS`: fine_tune_layers,
    fine_tune_epochs, flip_left_right, random_crop, random_scale,
    random_resized_crop, test_time_flip) default to None, "the preset's
    value": `__post_init__` fills each None from the preset named by
    `preset`, and keeps every value given. So `Config(preset="best")` is the
    best preset, and `Config(preset="best", flip_left_right=False)` is best
    without flips (a value equal to fast's still counts as given). Only
    construction resolves: `dataclasses.replace(config, preset="best")`
    passes the resolved values on as given, so it renames the preset
    without changing them; build a new Config to switch presets.
    """

    image_dir: Optional[str] = None
    # fast (the cached head) or best (the fine-tuning recipe): defaults for a
    # group of the settings below, which the YAML file and flags override.
    preset: str = "fast"
    bottleneck_dir: str = "cache"
    architecture: str = DEFAULT_BACKBONE
    backbone_weights: Optional[str] = None
    bottleneck_dtype: str = "float16"
    extraction_batch_size: int = 32
    engine: str = "auto"
    cache_only: bool = False
    num_shards: int = 1
    shard_index: int = 0
    output_dir: str = "output"
    output_graph: Optional[str] = None
    output_labels: Optional[str] = None
    saved_model_dir: Optional[str] = None
    tflite: list[str] = field(default_factory=list)
    # Also write OUTPUT_DIR/model.onnx (needs the [onnx] extra).
    onnx: bool = False
    summaries_dir: Optional[str] = None
    how_many_training_steps: int = 4000
    learning_rate: float = 0.003
    train_batch_size: int = 100
    validation_batch_size: int = -1
    test_batch_size: int = -1
    eval_step_interval: int = 10
    testing_percentage: float = 10.0
    validation_percentage: float = 10.0
    print_misclassified_test_images: bool = False
    class_weights: str = "none"
    report: bool = True
    seed: int = 0
    flip_left_right: Optional[bool] = None
    random_crop: Optional[float] = None
    random_scale: Optional[float] = None
    random_brightness: float = 0.0
    random_resized_crop: Optional[float] = None
    fine_tune_layers: Optional[int] = None
    # Fine-tuning defaults, measured on low-resolution photos (README,
    # "Distortions and fine-tuning"): a rate 10x below the head's, decaying
    # along a cosine, gains over the cached head in 3 epochs at batch 32;
    # 1e-3 destroys the ImageNet features.
    fine_tune_epochs: Optional[int] = None
    fine_tune_learning_rate: float = 3e-4
    fine_tune_batch_size: int = 32
    # The fine-tuning recipe (docs/training-paths.md, "The best preset"): a
    # linear warm-up over the first steps, rates that shrink by
    # fine_tune_layer_decay per block toward the input, AdamW's decoupled
    # weight decay and label smoothing.
    fine_tune_warmup_epochs: float = 0.3
    fine_tune_layer_decay: float = 0.7
    fine_tune_weight_decay: float = 0.02
    fine_tune_label_smoothing: float = 0.1
    # The exported model averages the logits of each picture and its mirror.
    test_time_flip: Optional[bool] = None
    # Share of in-distribution validation images the unknown detector accepts;
    # pictures scoring past that threshold are labelled "unknown".
    unknown_acceptance: float = 0.95

    def __post_init__(self):
        # Deferred: presets imports this module. An unknown preset name is
        # left for `validate` (or presets.resolve) to refuse with its message.
        from retrain.presets import PRESETS

        known = isinstance(self.preset, str) and self.preset in PRESETS
        for name, value in PRESETS[self.preset if known else "fast"].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def distortions(self) -> dict[str, Any]:
        """The distortion settings as keyword arguments of `distortions.distortion_function`."""
        return {name: getattr(self, name) for name in DISTORTION_FIELDS}

    def distorted(self) -> bool:
        """Whether any distortion is asked for (which turns the distortion path on)."""
        return any(self.distortions().values())

    def resolved_outputs(self) -> dict[str, Path]:
        """Paths of the model, labels and TensorBoard folder, defaulting into output_dir."""
        out = Path(self.output_dir)
        return {
            "output_graph": Path(self.output_graph or out / "model.keras"),
            "output_labels": Path(self.output_labels or out / "labels.txt"),
            "summaries_dir": Path(self.summaries_dir or out / "summaries"),
        }

    def tflite_paths(self) -> dict[str, Path]:
        """kind -> OUTPUT_DIR/model_<kind>.tflite for every --tflite kind, in the order given."""
        return {kind: Path(self.output_dir) / f"model_{kind}.tflite" for kind in self.tflite}

    def onnx_path(self) -> Path:
        """OUTPUT_DIR/model.onnx, where --onnx writes."""
        return Path(self.output_dir) / "model.onnx"


# none: every image counts the same in the loss; balanced: each class counts
# the same in total (weights n / (k * n_class), as scikit-learn's "balanced").
CLASS_WEIGHTS = ("none", "balanced")
FIELD_NAMES = tuple(f.name for f in fields(Config))
DISTORTION_FIELDS = (
    "flip_left_right",
    "random_crop",
    "random_scale",
    "random_brightness",
    "random_resized_crop",
)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of Config fields; unknown keys are an error.

    Returns only the keys present in the file, so that command-line flags can
    still override them.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise RetrainError(
            f"Cannot read config file: {exc.strerror}. Received: config={path}"
        ) from None
    except UnicodeDecodeError as exc:
        raise RetrainError(
            f"Config file {path} is not UTF-8 text ({exc.reason} at byte "
            f"{exc.start}). Received: config={path}"
        ) from None
    except yaml.YAMLError as exc:
        # PyYAML's messages span several lines; the CLI prints errors as one.
        where = " ".join(str(exc).split())
        raise RetrainError(f"Config file {path} is not valid YAML: {where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RetrainError(
            f"Config file {path} must hold a mapping of setting: value. "
            f"Received a {type(data).__name__}."
        )
    # YAML keys may be numbers or null as well as text; sort them all as text.
    unknown = sorted((key for key in data if key not in FIELD_NAMES), key=repr)
    if unknown:
        raise RetrainError(
            f"Config file {path} has unknown keys {unknown}. Known keys: {', '.join(FIELD_NAMES)}."
        )
    types = {f.name: f.type for f in fields(Config)}
    return {key: _coerce(key, value, types[key], path) for key, value in data.items()}


def _coerce(key: str, value: Any, type_name: str, path) -> Any:
    """Check a YAML value against the field's declared type (ints may stand for floats).

    A list[str] field takes a YAML list of strings, or one string for a one-item list.
    """
    if value is None and type_name.startswith("Optional"):
        return None
    if type_name == "list[str]":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise RetrainError(
                f"Config file {path}: '{key}' must be a list of strings. Received: {key}={value!r}"
            )
        return list(items)
    base = type_name.removeprefix("Optional[").removesuffix("]")
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool}[base]
    if isinstance(value, bool) and base != "bool" or not isinstance(value, expected):
        raise RetrainError(f"Config file {path}: '{key}' must be {base}. Received: {key}={value!r}")
    return float(value) if base == "float" else value


BOTTLENECK_DTYPES = ("float16", "float32")


def _count(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# field -> (test of the value, what it must be). The one place setting values
# are checked: `validate` for a whole Config, and the library functions that
# take settings as plain arguments (HeadSettings, discover, BottleneckCache) via
# `check_setting`, so a notebook user gets the same message as the command line.
_RULES = {
    **{
        name: (lambda v: _count(v) and v >= 1, "an integer of at least 1")
        for name in (
            "how_many_training_steps",
            "train_batch_size",
            "eval_step_interval",
            "extraction_batch_size",
        )
    },
    **{
        name: (
            lambda v: _count(v) and (v >= 1 or v == -1),
            "a positive integer, or -1 for the whole set",
        )
        for name in ("validation_batch_size", "test_batch_size")
    },
    "learning_rate": (lambda v: _real(v) and 0 < v < math.inf, "a positive finite number"),
    # NumPy's (and so Keras's) global seed must fit in 32 unsigned bits.
    "seed": (lambda v: _count(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    **{
        name: (lambda v: _real(v) and 0 <= v < 100, "a number in [0, 100)")
        for name in ("testing_percentage", "validation_percentage")
    },
    "num_shards": (lambda v: _count(v) and v >= 1, "an integer of at least 1"),
    "bottleneck_dtype": (lambda v: v in BOTTLENECK_DTYPES, " or ".join(BOTTLENECK_DTYPES)),
    "engine": (lambda v: v in ENGINE_NAMES, " or ".join(ENGINE_NAMES)),
    "preset": (lambda v: v in PRESET_NAMES, " or ".join(PRESET_NAMES)),
    "output_graph": (
        lambda v: v is None or isinstance(v, str) and v.endswith(".keras"),
        "a file name ending in .keras",
    ),
    "class_weights": (lambda v: v in CLASS_WEIGHTS, " or ".join(CLASS_WEIGHTS)),
    "tflite": (
        lambda v: isinstance(v, list) and set(v) <= set(TFLITE_KINDS) and len(set(v)) == len(v),
        f"a list of distinct kinds from {', '.join(TFLITE_KINDS)}",
    ),
    **{
        name: (lambda v: _real(v) and 0 <= v < math.inf, "a percentage of 0 or more")
        for name in ("random_crop", "random_scale")
    },
    # Brightness is multiplied by a factor in [1 - P/100, 1 + P/100].
    "random_brightness": (lambda v: _real(v) and 0 <= v <= 100, "a percentage from 0 to 100"),
    # The smallest share of the image's area a random crop keeps, in percent.
    "random_resized_crop": (lambda v: _real(v) and 0 <= v <= 100, "a percentage from 0 to 100"),
    "fine_tune_warmup_epochs": (lambda v: _real(v) and 0 <= v < math.inf, "0 or more epochs"),
    "fine_tune_layer_decay": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "fine_tune_weight_decay": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "fine_tune_label_smoothing": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "unknown_acceptance": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "fine_tune_layers": (
        lambda v: _count(v) and v >= -1,
        "0 (off), -1 (the whole backbone) or a number of layers",
    ),
    **{
        name: (lambda v: _count(v) and v >= 1, "an integer of at least 1")
        for name in ("fine_tune_epochs", "fine_tune_batch_size")
    },
    "fine_tune_learning_rate": (
        lambda v: _real(v) and 0 < v < math.inf,
        "a positive finite number",
    ),
}


def check_setting(name: str, value: Any, argument: str | None = None) -> None:
    """Raise RetrainError unless `value` is valid for the Config field `name`.

    `argument` is the name the caller received the value under (default: the
    field name); the message names it and the value received.
    """
    test, expected = _RULES[name]
    if not test(value):
        argument = argument or name
        raise RetrainError(f"{argument} must be {expected}. Received: {argument}={value!r}")


def check_split(testing_percentage: float, validation_percentage: float) -> None:
    """Both percentages valid, and together leaving images for training."""
    check_setting("testing_percentage", testing_percentage)
    check_setting("validation_percentage", validation_percentage)
    if testing_percentage + validation_percentage >= 100:
        raise RetrainError(
            "testing_percentage plus validation_percentage must be below 100 to leave "
            f"images for training. Received: testing_percentage={testing_percentage!r}, "
            f"validation_percentage={validation_percentage!r}"
        )


def check_shard(num_shards: int, shard_index: int) -> None:
    """num_shards at least 1 and shard_index in [0, num_shards)."""
    check_setting("num_shards", num_shards)
    if not (_count(shard_index) and 0 <= shard_index < num_shards):
        raise RetrainError(
            "shard_index must be an integer in [0, num_shards). "
            f"Received: num_shards={num_shards!r}, shard_index={shard_index!r}"
        )


def validate(config: Config) -> None:
    """Raise RetrainError naming the first setting whose value cannot work."""
    for name in _RULES:
        check_setting(name, getattr(config, name))
    check_split(config.testing_percentage, config.validation_percentage)
    if config.saved_model_dir is not None:
        check_saved_model_dir(
            config.saved_model_dir, [config.output_dir, *config.resolved_outputs().values()]
        )
    check_shard(config.num_shards, config.shard_index)
    if config.onnx:
        check_onnx_installed("--onnx")
    if config.num_shards > 1 and not config.cache_only:
        raise RetrainError(
            "--num_shards fills one part of the cache and needs --cache_only; train with a "
            f"run without --num_shards afterwards. Received: num_shards={config.num_shards}"
        )
    if not config.image_dir:
        raise RetrainError(
            "--image_dir is required: a folder with one sub-folder of images per class."
        )


def check_saved_model_dir(saved_model_dir, other_outputs=()) -> None:
    """--saved_model_dir is replaced whole, so it must hold nothing else.

    Refuses an empty name, a folder that is, contains or lies inside one of
    `other_outputs`, and an existing file or non-empty folder that is not a
    SavedModel (replacing it would lose its content).
    """
    target = Path(saved_model_dir or ".").resolve()
    clash = [
        other
        for other in map(Path, other_outputs)
        if other.resolve() == target or target in other.resolve().parents
    ]
    if not saved_model_dir or clash:
        raise RetrainError(
            "--saved_model_dir must be a folder of its own, not holding the other outputs (it is "
            f"replaced whole), e.g. OUTPUT_DIR/saved_model. Received: saved_model_dir={saved_model_dir}"
            + "".join(f", clashing with {other}" for other in clash[:1])
        )
    if os.path.lexists(target) and not target.is_dir():
        raise RetrainError(
            f"--saved_model_dir is a file; choose a new folder. Received: saved_model_dir={saved_model_dir}"
        )
    if target.is_dir() and any(target.iterdir()) and run_marker.read_marker(target) is None:
        # Only retrain's marker makes a folder replaceable, never a common name
        # (saved_model.pb is what every SavedModel holds, the user's own too).
        raise RetrainError(
            f"--saved_model_dir {target} holds files and was not written by retrain (no "
            f"{run_marker.MARKER}); replacing it would lose them. Choose a new or empty folder. "
            f"Received: saved_model_dir={saved_model_dir}"
        )
    if os.path.ismount(target):
        raise RetrainError(
            f"--saved_model_dir {target} is a mount point, which cannot be replaced by a rename; "
            f"use a folder inside it, e.g. {target / 'saved_model'}. "
            f"Received: saved_model_dir={saved_model_dir}"
        )


def save_yaml(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved settings (all fields) as YAML, e.g. output/settings.yaml."""
    atomic_write.write_text(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
