"""Unknown detection through every export format, on real photos.

The photo model (scikit-image's chelsea, coffee and rocket) gets a detector
fitted on its own photos' bottleneck vectors; new crops of those photos are
then known and other scikit-image photos (astronaut, camera, ...) unknown.
The .keras model (with its sidecar), the SavedModel and the TFLite files must
say the same; a model exported before unknown detection still labels.
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain import export, label_image
from retrain.evaluation import unknown
from retrain.export import saved_model, tflite, unknown_file, unknown_graph

OTHERS = {
    "astronaut": data.astronaut(),
    "camera": data.camera(),
    "hubble": data.hubble_deep_field(),
    "cells": data.immunohistochemistry(),
    "retina": data.retina(),
    "coins": data.coins(),
}
OWN = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}


def vectors_of(classifier, paths):
    """float32 [n, d]: the classifier's bottleneck vectors of image files, decoded as label_image."""
    pixels = tflite.calibration_pixels(paths, export.input_size(classifier))
    return export.fixed_size_classifier(classifier, with_vectors=True).predict_on_batch(pixels)[1]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """{path: "own" | "other"}: new crops of the trained photos and photos of other things."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(3)
    kinds = {}
    for group, photos in (("own", OWN), ("other", OTHERS)):
        for name, pixels in photos.items():
            height, width = pixels.shape[:2]
            top, left = rng.integers(0, height // 6), rng.integers(0, width // 6)
            crop = pixels[top : top + height * 5 // 6, left : left + width * 5 // 6]
            path = folder / f"{group}_{name}.jpg"
            Image.fromarray(crop).save(path, quality=92)
            kinds[str(path)] = group
    return kinds


@pytest.fixture(scope="module")
def scored(photo_model, tmp_path_factory):
    """The photo model copied with a sidecar detector, and its SavedModel and TFLite exports."""
    out = tmp_path_factory.mktemp("scored")
    graph = shutil.copy(photo_model["graph"], out / "model.keras")
    classifier = export.load_classifier(graph)
    photos = sorted(photo_model["photos"].glob("*/*.png"))
    vectors = vectors_of(classifier, photos)
    # Reference: 4 of the 6 crops of each photo; the threshold accepts all of the other 2.
    held = np.arange(len(photos)) % 3 == 0
    detector = unknown.fit(vectors[~held], vectors[held], acceptance=1.0, k=2)
    unknown_file.save(detector, unknown_file.unknown_path(graph), graph)
    model = unknown_graph.deployable(classifier, detector)
    names = photo_model["names"]
    graphs = {
        "keras": str(graph),
        "saved_model": str(
            saved_model.save_saved_model(model, names, out / "saved_model", detector.threshold)
        ),
    }
    calibration = tflite.calibration_pixels(photos, 224)
    for kind in ("float32", "int8"):
        path = out / f"model_{kind}.tflite"
        graphs[kind] = str(tflite.save_tflite(model, kind, names, path, calibration, detector))
    return {"graphs": graphs, "detector": detector, "classifier": classifier, "out": out}


def label(graph, labels, paths, capsys, *options):
    """(exit status, the --json document, stderr) of label_image."""
    status = label_image.main(
        ["--graph", graph, "--labels", labels, "--image", *paths, "--json", *options]
    )
    out, err = capsys.readouterr()
    return status, json.loads(out), err


def test_every_format_agrees_on_unknown(scored, photo_model, pictures, capsys):
    paths = list(pictures)
    detector = scored["detector"]
    expected = detector.scores(vectors_of(scored["classifier"], paths))
    # The photos of other things are unknown, the new crops of the trained ones are not.
    assert list(detector.is_unknown(expected)) == [kind == "other" for kind in pictures.values()]
    tolerance = {"keras": 2e-3, "saved_model": 2e-3, "float32": 2e-3, "int8": 0.1}
    for name, graph in scored["graphs"].items():
        status, document, err = label(graph, photo_model["labels"], paths, capsys)
        assert (status, err) == (0, ""), name
        assert document["unknown_threshold"] == pytest.approx(detector.threshold), name
        results = {result["image"]: result for result in document["results"]}
        scores = np.array([results[path]["unknown_score"] for path in paths])
        # The sidecar keeps the reference as float16: every format scores against those rows.
        np.testing.assert_allclose(scores, expected, atol=tolerance[name], err_msg=name)
        if name != "int8":
            assert [results[path]["unknown"] for path in paths] == list(
                detector.is_unknown(expected)
            ), name
        assert all(r["predictions"][0]["label"] in photo_model["names"] for r in results.values())


def test_formats_give_the_same_scores(scored, pictures):
    """The in-graph score equals the .keras sidecar's (float32 exactly, up to rounding)."""
    from retrain.export import loaders

    pixels = tflite.calibration_pixels(list(pictures), 224)
    scores = {
        name: loaders.load_pixel_classifier(graph).predict_scored(pixels)[1]
        for name, graph in scored["graphs"].items()
    }
    for name in ("saved_model", "float32"):
        np.testing.assert_allclose(scores[name], scores["keras"], atol=1e-5, err_msg=name)
    assert np.abs(scores["int8"] - scores["keras"]).max() < 0.1
    # The int8 file keeps its backbone int8 (only the score and the head are float32).
    sizes = {kind: os.path.getsize(scored["graphs"][kind]) for kind in ("float32", "int8")}
    assert sizes["int8"] <= 0.35 * sizes["float32"], sizes


def test_text_output_unknown_line_and_summary(scored, photo_model, pictures, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in pictures:
        shutil.copy(path, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "notes.txt").write_text("not an image")
    graph, labels = scored["graphs"]["keras"], photo_model["labels"]
    status = label_image.main(["--graph", graph, "--labels", labels, "--image", str(folder)])
    out, err = capsys.readouterr()
    assert status == 1 and len(err.splitlines()) == 1 and "broken.jpg" in err
    lines = out.splitlines()
    threshold = scored["detector"].threshold
    for kind, name in [("own", "cat"), ("other", "astronaut"), ("other", "camera")]:
        after = lines[lines.index(str(folder / f"{kind}_{name}.jpg")) + 1]
        if kind == "other":
            assert after.startswith("  unknown (score ") and f"threshold {threshold:.4f})" in after
        else:
            assert after.split()[0] == "cat"
    own = sum(kind == "own" for kind in pictures.values())
    others = len(pictures) - own
    assert (
        lines[-1] == f"{len(pictures) + 1} images: {own} labelled, {others} unknown, 1 unreadable"
    )

    status, document, _ = label(graph, labels, [str(folder)], capsys)
    assert document["summary"] == {
        "images": len(pictures) + 1,
        "labelled": own,
        "unknown": others,
        "unreadable": 1,
    }


def test_no_unknown_turns_it_off(scored, photo_model, pictures, capsys):
    paths = list(pictures)
    for graph in scored["graphs"].values():
        status, document, err = label(graph, photo_model["labels"], paths, capsys, "--no-unknown")
        assert (status, err) == (0, "")
        assert "unknown_threshold" not in document
        assert all(set(result) == {"image", "predictions"} for result in document["results"])
        assert document["summary"]["unknown"] == 0
    status = label_image.main(
        ["--graph", graph, "--labels", photo_model["labels"], "--image", *paths, "--no-unknown"]
    )
    assert "unknown" not in capsys.readouterr().out.replace(" 0 unknown,", "")


def test_serving_signature_says_unknown(scored, pictures):
    loaded = saved_model.tf.saved_model.load(scored["graphs"]["saved_model"])
    paths = list(pictures)
    images = saved_model.tf.constant([open(path, "rb").read() for path in paths])
    outputs = loaded.signatures["serving_default"](images=images)
    assert outputs["unknown"].dtype == saved_model.tf.bool
    assert outputs["unknown_score"].shape == (len(paths),)
    assert outputs["unknown"].numpy().tolist() == [kind == "other" for kind in pictures.values()]
    pixels = loaded.signatures["classify_pixels"](pixels=np.zeros((1, 224, 224, 3), np.float32))
    assert set(pixels) == {"probabilities", "unknown_score", "unknown"}


def test_tflite_carries_the_threshold(scored, photo_model, tmp_path, capsys):
    content = open(scored["graphs"]["float32"], "rb").read()
    entry = json.loads(tflite.metadata_entry(content, tflite.UNKNOWN_METADATA))
    detector = scored["detector"]
    assert entry == {
        "threshold": pytest.approx(detector.threshold),
        "k": detector.k,
        "acceptance": 1.0,
        "method": unknown_file.METHOD,
    }
    assert tflite.embedded_labels(content) == photo_model["names"]
    # A file whose entry is not ours: one line, exit 2.
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(tflite.with_metadata(_small_tflite(), {"retrain_unknown": b"[1"}))
    status = label_image.main(
        ["--graph", str(broken), "--labels", photo_model["labels"], "--image", __file__]
    )
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and "retrain_unknown" in err
    assert str(broken) in err


def _small_tflite():
    """A small real TFLite model: [1, 224, 224, 3] -> [1, 3] probabilities."""
    from retrain.engines import litert

    pixels = keras.Input((224, 224, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(pixels)
    return litert.convert(keras.Model(pixels, keras.layers.Dense(3, "softmax")(pooled)))


def old_classifier(classifier):
    """A classifier as exported before unknown detection: resizing -> backbone -> head
    (a Sequential softmax Dense), no bottleneck layer."""
    logits = classifier.get_layer("logits")
    head = keras.Sequential(
        [keras.Input((logits.kernel.shape[0],)), keras.layers.Dense(logits.units, "softmax")]
    )
    head.layers[-1].set_weights(logits.get_weights())
    images = keras.Input((None, None, 3), dtype="float32", name="image")
    resized = keras.layers.Resizing(224, 224, antialias=True, name="resize")(images)
    backbone = classifier.get_layer("efficientnet_lite0")
    return keras.Model(images, head(backbone(resized)), name="retrained_classifier")


def test_a_model_exported_before_unknown_detection_still_labels(
    scored, photo_model, pictures, tmp_path, capsys
):
    old = old_classifier(scored["classifier"])
    assert not export.classifier.has_vectors(old)
    names = photo_model["names"]
    fixed = unknown_graph.deployable(old, scored["detector"])  # no bottleneck: one output
    graphs = {
        "keras": str(export.save_classifier(old, tmp_path / "model.keras")),
        "saved_model": str(saved_model.save_saved_model(fixed, names, tmp_path / "saved_model")),
        "float32": str(tflite.save_tflite(fixed, "float32", names, tmp_path / "m.tflite")),
    }
    paths = [path for path, kind in pictures.items() if kind == "own"]
    capsys.readouterr()  # the exports' own messages
    for name, graph in graphs.items():
        status = label_image.main(
            ["--graph", graph, "--labels", photo_model["labels"], "--image", *paths, "--json"]
        )
        out, err = capsys.readouterr()
        assert status == 0, name
        document = json.loads(out)
        assert "unknown_threshold" not in document
        tops = [result["predictions"][0]["label"] for result in document["results"]]
        assert tops == [path.rsplit("_", 1)[1][:-4] for path in paths], name
        assert all("unknown" not in result for result in document["results"])


def test_a_missing_or_stale_sidecar_labels_with_one_warning(
    scored, photo_model, pictures, tmp_path, caplog, capsys
):
    graph = tmp_path / "model.keras"
    shutil.copy(scored["graphs"]["keras"], graph)
    path = next(iter(pictures))
    for state in ("missing", "stale"):
        if state == "stale":  # a sidecar of another model file
            unknown_file.save(scored["detector"], unknown_file.unknown_path(graph), __file__)
        caplog.clear()
        status, document, _ = label(str(graph), photo_model["labels"], [path], capsys)
        assert status == 0 and "unknown_threshold" not in document
        assert "unknown" not in document["results"][0]
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and str(graph) in warnings[0], warnings
