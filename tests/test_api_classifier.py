"""retrain.load and Classifier.predict: every export format, every kind of input, bad input.

One small run (test_api's photos) exports .keras, SavedModel, float32 TFLite
and, with the [onnx] extra installed, ONNX; each must label as label_image does.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image
from test_api import PHOTOS, SETTINGS, write_photos

import retrain
from retrain import label_image
from retrain.config import FIELD_NAMES

ONNX = "onnx" in FIELD_NAMES and all(
    importlib.util.find_spec(name) for name in ("onnx", "onnxruntime", "tf2onnx")
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{"run": RunResult, "graphs": format -> path, "images": [png paths]}."""
    base = tmp_path_factory.mktemp("api_classifier")
    images = write_photos(base / "photos", per_class=6)
    out = base / "out"
    extra = {"onnx": True} if ONNX else {}
    result = retrain.train(
        images,
        output_dir=out,
        bottleneck_dir=base / "cache",
        saved_model_dir=out / "saved_model",
        tflite=["float32"],
        **{**SETTINGS, **extra},
    )
    graphs = {
        "keras": result.model_path,
        "saved_model": out / "saved_model",
        "tflite": out / "model_float32.tflite",
    }
    if ONNX:
        graphs["onnx"] = out / "model.onnx"
    paths = sorted(str(path) for path in images.rglob("*.png"))
    return {"run": result, "graphs": graphs, "images": paths, "base": base}


def label_image_json(graph, labels, paths, capsys):
    status = label_image.main(
        ["--graph", str(graph), "--labels", str(labels), "--image", *paths, "--json"]
    )
    assert status == 0
    return json.loads(capsys.readouterr().out)["results"]


@pytest.mark.parametrize("kind", ["keras", "saved_model", "tflite", "onnx"])
def test_every_format_labels_as_label_image(exported, kind, capsys):
    if kind not in exported["graphs"]:
        pytest.skip("the [onnx] extra is not installed (or --onnx not there yet)")
    graph, paths = exported["graphs"][kind], exported["images"]
    expected = label_image_json(graph, exported["run"].labels_path, paths, capsys)
    # No labels= : each format finds its own (SavedModel assets, TFLite/ONNX metadata, beside).
    predictions = retrain.load(graph).predict(paths, top_k=3)
    assert [p.path for p in predictions] == paths
    for prediction, result in zip(predictions, expected):
        assert prediction.label == result["predictions"][0]["label"]
        got = [score for _, score in prediction.top]
        assert got == pytest.approx([p["score"] for p in result["predictions"]][:3], abs=1e-6)
        assert prediction.unknown == result.get("unknown")


def test_the_output_folder_and_labels_override(exported):
    run = exported["run"]
    classifier = retrain.load(run.output_dir)
    assert classifier.class_names == list(PHOTOS) and classifier.path == run.model_path
    renamed = retrain.load(run.model_path, labels=["a", "b", "c"])
    assert renamed.predict(exported["images"][0])[0].label in {"a", "b", "c"}
    with pytest.raises(retrain.RetrainError, match="3 outputs but"):
        retrain.load(run.output_dir, labels=["a", "b"])
    with pytest.raises(retrain.RetrainError, match="no model.keras"):
        retrain.load(exported["base"] / "photos")
    with pytest.raises(retrain.RetrainError, match="Model not found"):
        retrain.load(exported["base"] / "none.keras")


@pytest.fixture(scope="module")
def classifier(exported):
    return retrain.load(exported["run"].output_dir)


def test_a_path_a_pil_image_and_arrays_agree(classifier, exported):
    path = exported["images"][0]
    with Image.open(path) as image:
        image.load()
        pixels = np.asarray(image.convert("RGB"))
        predictions = classifier.predict([path, image, pixels, pixels.astype(np.float64)])
    probabilities = [dict(p.top) for p in predictions]
    for other in probabilities[1:]:
        assert other == pytest.approx(probabilities[0], abs=1e-4)
    assert predictions[0].path == path and predictions[1].path is None
    # An [n, h, w, 3] array is n images.
    assert len(classifier.predict(np.stack([pixels, pixels]))) == 2


def test_a_pil_image_is_converted_as_its_file_is(classifier, tmp_path):
    """Alpha composited on white and 16-bit scaled, as decode does for files."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    deep = (rng.integers(0, 65536, (40, 50)) // 1).astype(np.uint16)
    for name, image in [
        ("rgba.png", Image.fromarray(rgba, "RGBA")),
        ("deep.png", Image.fromarray(deep)),
    ]:
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as reopened:
            from_file, from_image = classifier.predict([str(tmp_path / name), reopened])
        assert dict(from_image.top) == pytest.approx(dict(from_file.top), abs=1e-6), name


def test_unknown_flag(classifier, exported):
    for prediction in classifier.predict(exported["images"][:4]):
        assert prediction.unknown == (prediction.score > classifier.unknown_threshold)
    without = retrain.load(exported["run"].output_dir, unknown=False)
    assert without.unknown_threshold is None
    assert without.predict(exported["images"][0])[0].unknown is None


def test_bad_images_name_their_index(classifier):
    good = np.zeros((8, 8, 3), np.uint8)
    cases = [
        (np.full((8, 8, 3), 300.0), r"images\[1\] must hold RGB values in \[0, 255\]"),
        (np.full((8, 8, 3), np.nan), r"images\[1\] must hold RGB values"),
        (np.zeros((8, 8)), r"images\[1\] must be an RGB array \[height, width, 3\]"),
        (np.zeros((8, 8, 3), bool), r"images\[1\] must hold numbers"),
        (3.5, r"images\[1\] must be a file path, a PIL image"),
    ]
    for bad, message in cases:
        with pytest.raises(retrain.RetrainError, match=message):
            classifier.predict([good, bad])
    with pytest.raises(retrain.RetrainError, match="top_k must be a positive integer"):
        classifier.predict(good, top_k=0)


def test_unreadable_files_raise_or_are_kept(classifier, exported, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(open(exported["images"][0], "rb").read()[:60])
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # must be refused, never opened for reading (it would block)
    with pytest.raises(retrain.RetrainError, match="Cannot decode image .*broken.png"):
        classifier.predict([exported["images"][0], str(broken)])
    kept = classifier.predict([str(broken), fifo, exported["images"][0]], on_error="keep")
    assert [p.error is None for p in kept] == [False, False, True]
    assert kept[0].top == [] and kept[0].label is None and kept[1].path == str(fifo)
    assert kept[2].label is not None


def test_tflite_labels_keep_every_character_of_a_class_name(exported):
    """The embedded labels split at "\\n" only, as labels.txt (a name may hold U+2028, \\x0b)."""
    from retrain.export import tflite

    names = ["line\u2028separator", "vertical\x0btab", "plain"]
    content = tflite.with_labels(exported["graphs"]["tflite"].read_bytes(), names)
    assert tflite.embedded_labels(content) == names
