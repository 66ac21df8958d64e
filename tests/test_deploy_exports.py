"""SavedModel (bytes in) and TFLite float32/float16/int8 exports of a model trained on real photos.

Every export labels images through `label_image` and must give the .keras
model's top class; the SavedModel's serving signature is called from a fresh
process that imports only TensorFlow, on JPEG and PNG bytes.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain import export, label_image
from retrain.data import images
from retrain.engines import litert
from retrain.errors import RetrainError
from retrain.export import deployment, saved_model, tflite

KINDS = ("float32", "float16", "int8")


@pytest.fixture(scope="module")
def exports(photo_model, tmp_path_factory):
    """The photo model's exports, from one fixed-size classifier, int8 calibrated on its photos."""
    out = tmp_path_factory.mktemp("exports")
    classifier = export.load_classifier(photo_model["graph"])
    fixed = export.fixed_size_classifier(classifier)
    names = photo_model["names"]
    graphs = {
        "keras": photo_model["graph"],
        "saved_model": str(saved_model.save_saved_model(fixed, names, out / "saved_model")),
    }
    calibration = tflite.calibration_pixels(sorted(photo_model["photos"].glob("*/*.png")), 224)
    for kind in KINDS:
        graphs[kind] = str(
            tflite.save_tflite(fixed, kind, names, out / f"model_{kind}.tflite", calibration)
        )
    return graphs


@pytest.fixture(scope="module")
def unseen(photo_model, tmp_path_factory):
    """Photos not trained on: new crops of the three photos, as JPEG (one large enough for
    reduced-scale decoding) and as PNG (one grayscale, one with alpha). {path: class}."""
    folder = tmp_path_factory.mktemp("unseen")
    sources = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}
    rng = np.random.default_rng(7)
    truth = {}
    for name, pixels in sources.items():
        height, width, _ = pixels.shape
        for number in range(3):
            top, left = rng.integers(0, height // 5), rng.integers(0, width // 5)
            crop = pixels[top : top + int(height * 0.8), left : left + int(width * 0.8)]
            path = folder / f"{name}_{number}.jpg"
            Image.fromarray(crop).save(path, quality=90)
            truth[str(path)] = name
    large = Image.fromarray(sources["cat"]).resize((1100, 1650), Image.BICUBIC)  # decoded at 1/2
    large.save(folder / "cat_large.jpg", quality=90)
    Image.fromarray(sources["coffee"]).convert("L").save(folder / "coffee_gray.png")
    rgba = np.dstack([sources["rocket"], np.full(sources["rocket"].shape[:2], 200, np.uint8)])
    Image.fromarray(rgba).save(folder / "rocket_alpha.png")
    truth.update(
        {
            str(folder / "cat_large.jpg"): "cat",
            str(folder / "coffee_gray.png"): "coffee",
            str(folder / "rocket_alpha.png"): "rocket",
        }
    )
    return truth


def label(graph, labels, paths, capsys):
    """{path: [(label, score), ...]} from label_image --json, and its exit status."""
    status = label_image.main(["--graph", graph, "--labels", labels, "--image", *paths, "--json"])
    out, err = capsys.readouterr()
    assert err == "", err
    document = json.loads(out)
    return status, {
        r["image"]: [(p["label"], p["score"]) for p in r["predictions"]]
        for r in document["results"]
    }


def test_every_export_gives_the_keras_top_class(exports, photo_model, unseen, capsys):
    paths = list(unseen) + [str(p) for p in sorted(photo_model["photos"].glob("*/[0-2].png"))]
    results = {}
    for name, graph in exports.items():
        status, results[name] = label(graph, photo_model["labels"], paths, capsys)
        assert status == 0, name
    reference = results["keras"]
    # The model is right on the unseen photos, so agreement below is about the right class.
    assert sum(reference[p][0][0] == truth for p, truth in unseen.items()) >= len(unseen) - 1
    for name in exports:
        assert [results[name][p][0][0] for p in paths] == [reference[p][0][0] for p in paths], name
    tolerance = {"saved_model": 1e-5, "float32": 1e-4, "float16": 1e-2, "int8": 0.1}
    for name, atol in tolerance.items():
        for path in paths:
            np.testing.assert_allclose(
                dict(results[name][path])[reference[path][0][0]],
                reference[path][0][1],
                atol=atol,
                err_msg=f"{name} {path}",
            )


SERVING = """
import json, sys
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
images = tf.constant([open(p, "rb").read() for p in sys.argv[2:]])
outputs = model.signatures["serving_default"](images=images)
assert model(images)["label"].numpy().tolist() == outputs["label"].numpy().tolist()
print(json.dumps({key: value.numpy().tolist() for key, value in outputs.items()}, default=bytes.decode))
assert not any(name.startswith("retrain") for name in sys.modules)
"""


def test_serving_signature_takes_image_bytes_in_a_fresh_process(
    exports, photo_model, unseen, capsys
):
    paths = list(unseen)
    _, reference = label(exports["keras"], photo_model["labels"], paths, capsys)
    done = subprocess.run(
        [sys.executable, "-c", SERVING, exports["saved_model"], *paths],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr
    outputs = json.loads(done.stdout.splitlines()[-1])
    assert outputs["label"] == [reference[p][0][0] for p in paths]
    assert [row[0] for row in outputs["top_labels"]] == outputs["label"]
    assert np.array(outputs["top_scores"]).shape == (len(paths), 3)
    # Bytes decoded in the graph give label_image's (Pillow's) probabilities.
    for path, row in zip(paths, outputs["probabilities"]):
        np.testing.assert_allclose(
            row[photo_model["names"].index(reference[path][0][0])],
            reference[path][0][1],
            atol=2e-3,
            err_msg=path,
        )


def test_tflite_files_carry_their_labels_and_int8_is_full_integer(exports, photo_model):
    for kind in KINDS:
        content = open(exports[kind], "rb").read()
        assert tflite.embedded_labels(content) == photo_model["names"]
    sizes = {kind: os.path.getsize(exports[kind]) for kind in KINDS}
    assert sizes["int8"] <= 0.35 * sizes["float32"] and sizes["float16"] <= 0.55 * sizes["float32"]
    interpreter = litert.interpreter_class()(model_path=exports["int8"])
    types = {detail["dtype"] for detail in interpreter.get_tensor_details()}
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    assert inputs[0]["dtype"] == outputs[0]["dtype"] == np.float32
    float_tensors = [d for d in interpreter.get_tensor_details() if d["dtype"] == np.float32]
    assert np.int8 in types and len(float_tensors) <= 2, [d["name"] for d in float_tensors]


def test_unusable_models_exit_2_with_one_line(exports, photo_model, tmp_path, capsys):
    image = str(photo_model["photos"] / "cat" / "0.png")
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 40)
    not_saved_model = tmp_path / "folder"
    not_saved_model.mkdir()
    two_labels = tmp_path / "labels.txt"
    two_labels.write_text("cat\ncoffee\n", encoding="utf-8")
    for graph, labels, message in [
        (str(fake), photo_model["labels"], "Cannot load TFLite model"),
        (str(not_saved_model), photo_model["labels"], "no saved_model.pb"),
        (exports["int8"], str(two_labels), "3 outputs but"),
        (exports["saved_model"], str(two_labels), "3 outputs but"),
    ]:
        status = label_image.main(["--graph", graph, "--labels", labels, "--image", image])
        out, err = capsys.readouterr()
        assert (status, out) == (2, ""), err
        assert len(err.splitlines()) == 1 and message in err and graph in err


def test_saved_model_is_replaced_atomically(exports, photo_model, tmp_path, monkeypatch):
    fixed = export.fixed_size_classifier(export.load_classifier(photo_model["graph"]))
    target = tmp_path / "saved_model"
    saved_model.save_saved_model(fixed, photo_model["names"], target)
    before = (target / "saved_model.pb").read_bytes()

    def crash(module, folder, **kwargs):
        open(os.path.join(folder, "saved_model.pb"), "wb").write(b"half written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saved_model.tf.saved_model, "save", crash)
    with pytest.raises(RetrainError, match="No space left on device"):
        saved_model.save_saved_model(fixed, photo_model["names"], target)
    assert (target / "saved_model.pb").read_bytes() == before
    assert os.listdir(tmp_path) == ["saved_model"]

    monkeypatch.undo()
    (target / "notes.txt").write_text("the user's")
    saved_model.save_saved_model(fixed, photo_model["names"], target)
    assert sorted(os.listdir(tmp_path)) == ["saved_model"]  # no temporary or set-aside folder left
    assert saved_model.PixelClassifier(target).num_classes == len(photo_model["names"])
    assert (target / "notes.txt").read_text() == "the user's"  # carried into the new export


@pytest.mark.parametrize(
    "content",
    [
        {"keep.jpg": b"precious"},
        {"saved_model.pb": b"someone else's SavedModel", "variables/variables.index": b"theirs"},
    ],
)
def test_a_folder_retrain_did_not_write_is_never_replaced(exports, photo_model, tmp_path, content):
    fixed = export.fixed_size_classifier(export.load_classifier(photo_model["graph"]))
    other = tmp_path / "photos_of_mine"
    for name, bytes_ in content.items():
        (other / name).parent.mkdir(parents=True, exist_ok=True)
        (other / name).write_bytes(bytes_)
    with pytest.raises(RetrainError, match="was not written by retrain"):
        saved_model.save_saved_model(fixed, photo_model["names"], other)
    assert {name: (other / name).read_bytes() for name in content} == content


def test_failed_conversion_keeps_the_previous_file(photo_model, tmp_path):
    fixed = export.fixed_size_classifier(export.load_classifier(photo_model["graph"]))
    target = tmp_path / "model_int8.tflite"
    target.write_bytes(b"previous export")
    with pytest.raises(RetrainError, match="calibration images"):
        tflite.save_tflite(
            fixed, "int8", photo_model["names"], target, calibration=np.zeros((0, 224, 224, 3))
        )
    assert target.read_bytes() == b"previous export" and os.listdir(tmp_path) == [target.name]


def test_calibration_sample_takes_classes_in_turn(photo_model):
    image_list = images.discover(photo_model["photos"], 0, 0)
    sample = deployment.calibration_entries(image_list.entries, 7)
    assert [entry.label_index for entry in sample] == [0, 1, 2, 0, 1, 2, 0]
    assert sample == deployment.calibration_entries(list(reversed(image_list.entries)), 7)
    assert len(deployment.calibration_entries(image_list.entries, 1000)) == len(image_list.entries)


def test_a_run_writes_the_exports_it_is_asked_for(photo_model, tmp_path, capsys):
    from retrain import cli

    out = tmp_path / "out"
    status = cli.main(
        [
            "--image_dir",
            str(photo_model["photos"]),
            "--bottleneck_dir",
            str(tmp_path / "cache"),
            "--output_dir",
            str(out),
            "--saved_model_dir",
            str(out / "saved_model"),
            "--tflite",
            "float16",
            "--how_many_training_steps",
            "20",
            "--testing_percentage",
            "0",
            "--validation_percentage",
            "0",
        ]
    )
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "Saved TFLite float16 model" in printed.out
    assert sorted(p.name for p in out.iterdir() if "model" in p.name) == [
        "model.keras",
        "model.unknown.h5",
        "model_float16.tflite",
        "saved_model",
    ]
    assert (out / "saved_model" / "assets" / "labels.txt").read_text() == "cat\ncoffee\nrocket\n"
    # The run's detector went into every export: they agree on unknown for the same pictures.
    images = [str(photo_model["photos"] / "coffee" / "0.png"), str(photo_model["photos"])]
    images.append(__file__.replace(".py", "_missing.jpg"))
    documents = {}
    for graph in ("model.keras", "model_float16.tflite", "saved_model"):
        arguments = ["--graph", str(out / graph), "--labels", str(out / "labels.txt"), "--json"]
        assert label_image.main([*arguments, "--image", *images]) == 1  # the missing file
        documents[graph] = json.loads(capsys.readouterr().out)
    for graph, document in documents.items():
        assert document["results"][0]["predictions"][0]["label"] == "coffee", graph
        assert "unknown_threshold" in document, graph
        verdicts = [result["unknown"] for result in document["results"]]
        assert verdicts == [r["unknown"] for r in documents["model.keras"]["results"]], graph
        assert document["summary"]["images"] == 2 + len(list(photo_model["photos"].glob("*/*.png")))
        assert document["summary"]["unreadable"] == 1
