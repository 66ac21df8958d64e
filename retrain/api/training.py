"""`retrain.train(image_dir, **settings) -> RunResult`: the command line's run, from Python.

The settings are the command line's (docs/settings.md): the same names,
defaults, presets and checks, resolved by the same function
(`presets.config_from`: defaults < preset < the `config=` YAML file <
keyword arguments), then the same `run.run`. A bad value raises
`retrain.RetrainError` with the command line's message; nothing exits the
process. The run prints its results on stdout only with `verbose=True`, and
progress bars (stderr) with `progress=True` or when stderr is a terminal.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrain import console, presets
from retrain.api.settings import settings_of
from retrain.config import Config

if TYPE_CHECKING:
    import keras

    from retrain.api.classifier import Classifier

PathLike = str | os.PathLike


@dataclass(frozen=True)
class RunResult:
    """What `retrain.train` produced.

    test_accuracy: share of the test bucket labelled right, in [0, 1]
      (metrics.json's "accuracy"); None without test images or for a
      cache_only run.
    validation_accuracy: the same on the validation bucket, None without one.
    class_names: the classes in the model's output order (labels.txt).
    output_dir: the run's output folder.
    model_path / labels_path: model.keras and labels.txt (None for cache_only).
    metrics: the content of OUTPUT_DIR/metrics.json ({} without one).
    config: the resolved settings (what OUTPUT_DIR/settings.yaml records).
    exports: "saved_model" / a TFLite kind / "onnx" -> the path written.
    skipped: (relative path, reason) of every image the run could not use.
    """

    test_accuracy: float | None
    validation_accuracy: float | None
    class_names: list[str]
    output_dir: Path
    model_path: Path | None
    labels_path: Path | None
    metrics: dict[str, Any]
    config: Config
    exports: dict[str, Path] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @functools.cached_property
    def model(self) -> keras.Model:
        """The trained Keras model (model.keras), loaded on first use: uint8 or float32
        [batch, height, width, 3] RGB in [0, 255] -> float32 [batch, classes] probabilities."""
        if self.model_path is None:
            raise AttributeError("a cache_only run trains no model")
        from retrain.export.keras_file import load_classifier

        return load_classifier(self.model_path)

    def load(self, *, unknown: bool = True) -> Classifier:
        """The trained model as a `retrain.Classifier` (see `retrain.load`)."""
        from retrain.api.classifier import load

        if self.model_path is None:
            raise AttributeError("a cache_only run trains no model")
        return load(self.model_path, labels=self.labels_path, unknown=unknown)


def train(
    image_dir: PathLike | None = None,
    *,
    config: PathLike | None = None,
    verbose: bool = False,
    progress: bool | None = None,
    **settings: Any,
) -> RunResult:
    """Train a classifier on `image_dir` (one sub-folder of images per class), as the command line.

    Args:
      image_dir: the folder of class folders (or the `config` file's image_dir).
      config: a YAML file of settings, as `--config`; keyword arguments override it.
      verbose: print the run's result lines on stdout (accuracy, saved paths),
        as the command line does. Notes and warnings go to stderr (logging) either way.
      progress: progress bars on stderr; None (default) shows them when stderr is a terminal.
      **settings: any flag of `python -m retrain` without `--`, e.g.
        `how_many_training_steps=500`, `preset="best"`, `tflite=["int8"]`,
        `output_dir=Path("out")`.

    Returns:
      RunResult.

    Raises:
      RetrainError: an unknown setting (with close matches), a bad value (the
        command line's message), a missing folder, any bad input the run meets.
    """
    given = settings_of(settings)
    if image_dir is not None:
        given["image_dir"] = settings_of({"image_dir": image_dir})["image_dir"]
    resolved = presets.config_from(given, config)
    show_progress = sys.stderr.isatty() if progress is None else bool(progress)
    from retrain.quiet_tensorflow import import_tensorflow

    import_tensorflow()
    from retrain import run  # deferred: it imports the stages, which import TensorFlow

    with console.shown(results=verbose, progress=show_progress):
        outcome = run.run(resolved)
    return _result(resolved, outcome)


def _result(config: Config, outcome) -> RunResult:
    """The public RunResult of a run.run result."""
    output_dir = Path(config.output_dir)
    metrics: dict[str, Any] = {}
    if outcome.model_path is not None and (output_dir / "metrics.json").is_file():
        metrics = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))
    evaluation = outcome.evaluation
    return RunResult(
        test_accuracy=None if evaluation is None else float(evaluation.accuracy),
        validation_accuracy=outcome.validation_accuracy,
        class_names=list(outcome.image_list.class_names),
        output_dir=output_dir,
        model_path=outcome.model_path,
        labels_path=outcome.labels_path,
        metrics=metrics,
        config=config,
        exports=dict(outcome.deployment_paths),
        skipped=[
            (str(path), str(reason))
            for path, reason in [*outcome.image_list.skipped, *outcome.cache_report.failed]
        ],
    )
