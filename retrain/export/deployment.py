"""The deployment exports of a run: SavedModel and TFLite, all from one fixed-size classifier.

With an unknown detector that model also computes the unknown score
(`retrain.export.unknown_graph.deployable`). The int8 TFLite export
calibrates on a fixed sample of training images, `calibration_entries`,
spread over the classes.
"""

from __future__ import annotations

from pathlib import Path

from retrain.data import sampling
from retrain.files import output_folder


def export_for_deployment(
    classifier,
    image_list,
    training_entries,
    config,
    folder: output_folder.OutputFolder,
    detector=None,
) -> dict:
    """The SavedModel and TFLite exports the Config asks for (--saved_model_dir, --tflite).

    classifier: the Keras classifier, uint8/float32 RGB [b, h, w, 3] ->
    float32 [b, num_classes]. detector: the UnknownDetector fitted in its
    bottleneck space, or None (the exports then carry no unknown score).
    They are written where `folder` places them (the staging folder, for
    paths inside output_dir). Returns {"saved_model" or TFLite kind: final Path}.
    """
    from retrain import export  # deferred: these import TensorFlow
    from retrain.export import saved_model, tflite, unknown_graph

    fixed = unknown_graph.deployable(classifier, detector)
    detector = detector if unknown_graph.is_scored(fixed) else None
    written = {}
    if config.saved_model_dir:
        saved_model.save_saved_model(
            fixed,
            image_list.class_names,
            folder.place_folder(config.saved_model_dir),
            None if detector is None else detector.threshold,
        )
        written["saved_model"] = Path(config.saved_model_dir)
        print(f"Saved SavedModel {config.saved_model_dir} (serving_default takes encoded images).")
    calibration = None
    if "int8" in config.tflite:
        sample = calibration_entries(training_entries, tflite.CALIBRATION_IMAGES)
        calibration = tflite.calibration_pixels(
            [image_list.image_dir / entry.relative_path for entry in sample],
            export.input_size(classifier),
        )
    for kind, path in config.tflite_paths().items():
        staged = tflite.save_tflite(
            fixed, kind, image_list.class_names, folder.place(path), calibration, detector
        )
        written[kind] = path
        print(f"Saved TFLite {kind} model {path} ({staged.stat().st_size / 1e6:.1f} MB).")
    return written


def calibration_entries(training_entries, count: int) -> list:
    """Up to `count` training images spread over the classes: sampling.spread_over_classes."""
    return sampling.spread_over_classes(training_entries, count)
