"""One place for the settings of a run: defaults < YAML file < command line.

`Config` holds every setting with its default. `load_yaml` reads a YAML mapping
and refuses keys that are not fields (a typo must not be silently ignored).
`validate` checks values; `save_yaml` writes the resolved settings beside the
outputs so every output folder says exactly what produced it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from retrain.backbones import DEFAULT_BACKBONE
from retrain.errors import RetrainError


@dataclass
class Config:
    """Every setting of a run, with retrain.py's names where they apply."""

    image_dir: Optional[str] = None
    bottleneck_dir: str = "cache"
    architecture: str = DEFAULT_BACKBONE
    backbone_weights: Optional[str] = None
    bottleneck_dtype: str = "float16"
    extraction_batch_size: int = 32
    cache_only: bool = False
    output_dir: str = "output"
    output_graph: Optional[str] = None
    output_labels: Optional[str] = None
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
    seed: int = 0

    def resolved_outputs(self) -> dict[str, Path]:
        """Paths of the model, labels and TensorBoard folder, defaulting into output_dir."""
        out = Path(self.output_dir)
        return {
            "output_graph": Path(self.output_graph or out / "model.keras"),
            "output_labels": Path(self.output_labels or out / "labels.txt"),
            "summaries_dir": Path(self.summaries_dir or out / "summaries"),
        }


FIELD_NAMES = tuple(f.name for f in fields(Config))


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of Config fields; unknown keys are an error.

    Returns only the keys present in the file, so that command-line flags can
    still override them.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise RetrainError(f"Cannot read config file: {exc.strerror}. Received: config={path}") from None
    except UnicodeDecodeError as exc:
        raise RetrainError(f"Config file {path} is not UTF-8 text ({exc.reason} at byte "
                           f"{exc.start}). Received: config={path}") from None
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
            f"Config file {path} has unknown keys {unknown}. "
            f"Known keys: {', '.join(FIELD_NAMES)}."
        )
    types = {f.name: f.type for f in fields(Config)}
    return {key: _coerce(key, value, types[key], path) for key, value in data.items()}


def _coerce(key: str, value: Any, type_name: str, path) -> Any:
    """Check a YAML value against the field's declared type (ints may stand for floats)."""
    if value is None and type_name.startswith("Optional"):
        return None
    base = type_name.removeprefix("Optional[").removesuffix("]")
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool}[base]
    if isinstance(value, bool) and base != "bool" or not isinstance(value, expected):
        raise RetrainError(
            f"Config file {path}: '{key}' must be {base}. Received: {key}={value!r}"
        )
    return float(value) if base == "float" else value


def validate(config: Config) -> None:
    """Raise RetrainError naming the first setting whose value cannot work."""
    positive = ("how_many_training_steps", "train_batch_size", "eval_step_interval",
                "extraction_batch_size")
    for name in positive:
        if getattr(config, name) < 1:
            raise RetrainError(f"--{name} must be at least 1. Received: {name}={getattr(config, name)}")
    for name in ("validation_batch_size", "test_batch_size"):
        value = getattr(config, name)
        if value == 0 or value < -1:
            raise RetrainError(f"--{name} must be positive, or -1 for the whole set. Received: {name}={value}")
    if not 0 < config.learning_rate < math.inf:
        raise RetrainError(f"--learning_rate must be positive. Received: learning_rate={config.learning_rate}")
    if not 0 <= config.seed < 2**32:
        # NumPy's (and so Keras's) global seed must fit in 32 unsigned bits.
        raise RetrainError(f"--seed must be in [0, 2**32). Received: seed={config.seed}")
    for name in ("testing_percentage", "validation_percentage"):
        value = getattr(config, name)
        if not 0 <= value < 100:
            raise RetrainError(f"--{name} must be in [0, 100). Received: {name}={value}")
    if config.testing_percentage + config.validation_percentage >= 100:
        raise RetrainError(
            "--testing_percentage plus --validation_percentage must leave images for training. "
            f"Received: testing_percentage={config.testing_percentage}, "
            f"validation_percentage={config.validation_percentage}"
        )
    if config.bottleneck_dtype not in ("float16", "float32"):
        raise RetrainError(
            f"--bottleneck_dtype must be float16 or float32. Received: bottleneck_dtype={config.bottleneck_dtype}"
        )
    if config.output_graph and not config.output_graph.endswith(".keras"):
        raise RetrainError(
            f"--output_graph must be a file name ending in .keras. Received: output_graph={config.output_graph}"
        )
    if not config.image_dir:
        raise RetrainError("--image_dir is required: a folder with one sub-folder of images per class.")


def save_yaml(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved settings (all fields) as YAML, e.g. output/settings.yaml."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(dataclasses.asdict(config), handle, sort_keys=False)
