"""The deployment exports of a run: SavedModel, TFLite and ONNX, all from one fixed-size classifier.

With an unknown detector that model also computes the unknown score
(`retrain.export.unknown_graph.deployable`). The int8 TFLite export
calibrates on a fixed sample of training images, `calibration_entries`,
spread over the classes; the ONNX export is checked on a few of them.
"""

from __future__ import annotations

from pathlib import Path

from retrain import console
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
    """The SavedModel, TFLite and ONNX exports the Config asks for (--saved_model_dir,
    --tflite, --onnx).

    classifier: the Keras classifier, uint8/float32 RGB [b, h, w, 3] ->
    float32 [b, num_classes]. detector: the UnknownDetector fitted in its
    bottleneck space, or None (the exports then carry no unknown score).
    They are written where `folder` places them (the staging folder, for
    paths inside output_dir). Returns {"saved_model", a TFLite kind or "onnx": final Path}.
    """
    from retrain.export import saved_model, unknown_graph  # deferred: these import TensorFlow

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
        console.result(
            f"Saved SavedModel {config.saved_model_dir} (serving_default takes encoded images)."
        )
    if config.tflite:
        written.update(
            _export_tflite(fixed, image_list, training_entries, config, folder, detector)
        )
    if config.onnx:
        written["onnx"] = _export_onnx(
            fixed, image_list, training_entries, config, folder, detector
        )
    return written


def _export_tflite(fixed, image_list, training_entries, config, folder, detector) -> dict:
    """The --tflite kinds, int8 calibrated on CALIBRATION_IMAGES training images: {kind: Path}."""
    from retrain.export import tflite

    calibration = None
    if "int8" in config.tflite:
        calibration = _sample_pixels(
            image_list, training_entries, tflite.CALIBRATION_IMAGES, fixed.inputs[0].shape[1]
        )
    written = {}
    for kind, path in config.tflite_paths().items():
        staged = tflite.save_tflite(
            fixed, kind, image_list.class_names, folder.place(path), calibration, detector
        )
        written[kind] = path
        console.result(f"Saved TFLite {kind} model {path} ({staged.stat().st_size / 1e6:.1f} MB).")
    return written


def _export_onnx(fixed, image_list, training_entries, config, folder, detector) -> Path:
    """OUTPUT_DIR/model.onnx, checked against `fixed` on CHECK_IMAGES training images."""
    from retrain.export import onnx_export

    path = config.onnx_path()
    pixels = _sample_pixels(
        image_list, training_entries, onnx_export.CHECK_IMAGES, fixed.inputs[0].shape[1]
    )
    staged, difference = onnx_export.save_onnx(
        fixed, image_list.class_names, folder.place(path), pixels, detector, shown_as=path
    )
    console.result(
        f"Saved ONNX model {path} ({staged.stat().st_size / 1e6:.1f} MB; outputs within "
        f"{difference:.1e} of the Keras model's on {len(pixels)} of the run's images)."
    )
    return path


def _sample_pixels(image_list, training_entries, count: int, size: int):
    """float32 [n, size, size, 3]: up to `count` training images spread over the classes,
    decoded and resized as extraction does (`tflite.calibration_pixels`)."""
    from retrain.export import tflite

    sample = calibration_entries(training_entries, count)
    return tflite.calibration_pixels(
        [image_list.image_dir / entry.relative_path for entry in sample], int(size)
    )


def calibration_entries(training_entries, count: int) -> list:
    """Up to `count` training images spread over the classes: sampling.spread_over_classes."""
    return sampling.spread_over_classes(training_entries, count)
