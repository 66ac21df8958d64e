"""The exported classifier (resize + Lite0 + head) and the labels file."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from skimage import data

from retrain import backbones, export
from retrain.data import resizing
from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow
from retrain.training.head import build_head

tf = import_tensorflow()

NAMES = ["cat", "coffee", "person"]
# Real photos at their own sizes: 300x451, 400x600, 512x512, and a small crop.
PHOTOS = {
    "chelsea": data.chelsea(),
    "coffee": data.coffee(),
    "astronaut": data.astronaut(),
    "small": data.astronaut()[40:77, 180:231],
}


@pytest.fixture(scope="module")
def parts():
    """Lite0 (real weights), a head with seeded random weights, and the classifier."""
    spec = backbones.get("efficientnet_lite0")
    backbone = backbones.load(spec.name)
    head = build_head(spec.feature_dim, len(NAMES))
    rng = np.random.default_rng(0)
    head.set_weights([rng.normal(0, 0.05, w.shape).astype(np.float32) for w in head.get_weights()])
    classifier = export.build_classifier(backbone, head, spec.input_size)
    return backbone, head, classifier, spec.input_size


@pytest.fixture(scope="module")
def in_process(parts):
    """Probabilities of backbone -> head on the pixels the classifier's own resizing
    makes (TensorFlow's antialiased bilinear: resize_to_input of a tensor)."""
    backbone, head, _, size = parts
    return {
        name: head.predict(
            backbone.predict(resizing.resize_to_input(tf.constant(pixels), size)[None], verbose=0),
            verbose=0,
        )[0]
        for name, pixels in PHOTOS.items()
    }


@pytest.fixture(scope="module")
def training_path(parts):
    """Probabilities the way training sees images: resize_to_input of numpy pixels
    (Pillow's uint8 resize, within one level of TensorFlow's) -> backbone -> head."""
    backbone, head, _, size = parts
    return {
        name: head.predict(
            backbone.predict(resizing.resize_to_input(pixels, size)[None], verbose=0), verbose=0
        )[0]
        for name, pixels in PHOTOS.items()
    }


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.keras"
    export.save_classifier(parts[2], path)
    return path


def classify(model, pixels):
    return model.predict(pixels[None].astype(np.float32), verbose=0)[0]


def test_classifier_matches_the_training_path_at_any_size(parts, in_process, training_path):
    classifier = parts[2]
    assert classifier.input_shape == (None, None, None, 3)
    for name, pixels in PHOTOS.items():
        probabilities = classify(classifier, pixels)
        assert probabilities.shape == (len(NAMES),)
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(probabilities, in_process[name], atol=1e-5, err_msg=name)
        # Training's pixels are within one level of the classifier's own resizing:
        # Lite0's vectors move by 2-8% (relative L2), the probabilities by little.
        np.testing.assert_allclose(probabilities, training_path[name], atol=0.02, err_msg=name)
    # The photos are told apart: a constant model would pass the checks above.
    assert np.ptp([in_process[name] for name in PHOTOS], axis=0).max() > 1e-3


def test_saved_model_loads_with_the_same_probabilities(saved, in_process):
    loaded = export.load_classifier(saved)
    assert export.input_size(loaded) == 224
    for name, pixels in PHOTOS.items():
        np.testing.assert_allclose(
            classify(loaded, pixels), in_process[name], atol=1e-5, err_msg=name
        )


def test_saved_model_uses_only_builtin_keras_layers(saved):
    with zipfile.ZipFile(saved) as archive:
        config = json.loads(archive.read("config.json"))

    def modules(node):
        if isinstance(node, dict):
            if "class_name" in node and "module" in node:
                yield node["module"] or ""
            for value in node.values():
                yield from modules(value)
        elif isinstance(node, list):
            for value in node:
                yield from modules(value)

    found = set(modules(config))
    assert found and all(module.startswith("keras") for module in found), found


def test_fresh_process_loads_with_keras_alone(saved, in_process, tmp_path):
    """No retrain import, no custom objects: plain Keras loads and runs the file."""
    np.save(tmp_path / "coffee.npy", PHOTOS["coffee"])
    script = (
        "import sys, json, numpy as np, keras\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "pixels = np.load(sys.argv[2]).astype('float32')[None]\n"
        "print(json.dumps(model.predict(pixels, verbose=0)[0].tolist()))\n"
        "assert not any(name.startswith('retrain') for name in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(saved), str(tmp_path / "coffee.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr
    probabilities = json.loads(result.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(probabilities, in_process["coffee"], atol=1e-5)


def test_save_replaces_atomically_and_leaves_no_temporary_file(parts, tmp_path):
    target = tmp_path / "out" / "model.keras"
    target.parent.mkdir()
    target.write_bytes(b"an older export")
    export.save_classifier(parts[1], target)
    assert zipfile.is_zipfile(target)
    assert os.listdir(target.parent) == ["model.keras"]


def test_failed_save_keeps_the_previous_file(parts, tmp_path, monkeypatch):
    target = tmp_path / "model.keras"
    target.write_bytes(b"previous export")

    def crash(self, path, *args, **kwargs):
        open(path, "wb").write(b"half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(parts[1]), "save", crash)
    with pytest.raises(RetrainError, match="No space left on device"):
        export.save_classifier(parts[1], target)
    assert target.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["model.keras"]


def test_save_refuses_other_suffixes(parts, tmp_path):
    with pytest.raises(RetrainError, match=r"must end in \.keras. Received: path=.*model\.h5"):
        export.save_classifier(parts[1], tmp_path / "model.h5")


@pytest.mark.parametrize(
    "read, name, content, message",
    [
        (export.load_classifier, "model.keras", None, "Model file not found"),
        (export.load_classifier, "model.keras", b"not a zip at all", "Refusing model"),
        (export.load_classifier, "model.keras", b"PK\x03\x04 truncated zip", "Refusing model"),
        (export.read_labels, "labels.txt", None, "Cannot read labels file"),
        (export.read_labels, "labels.txt", b"", "one class name per line"),
        (export.read_labels, "labels.txt", b"cat\n\ndog\n", "no blank"),
        (export.read_labels, "labels.txt", b"\xff\xfe\x00c", "not UTF-8"),
    ],
)
def test_unusable_files_are_named_in_one_line(tmp_path, read, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RetrainError, match=message) as raised:
        read(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_input_size_needs_a_resizing_layer(parts):
    assert export.input_size(parts[2]) == 224
    with pytest.raises(RetrainError, match="no Resizing layer"):
        export.input_size(parts[1])


def test_labels_round_trip_in_order(tmp_path):
    names = ["sunflowers", "Ähre", "daisy", "with space"]
    path = export.write_labels(names, tmp_path / "sub" / "labels.txt")
    assert path.read_text(encoding="utf-8") == "sunflowers\nÄhre\ndaisy\nwith space\n"
    assert export.read_labels(path) == names


# Legal folder names that str.splitlines() would cut in two, and other awkward ones.
HOSTILE_NAMES = [
    "line\u2028sep",
    "para\u2029sep",
    "next\x85line",
    "vertical\x0btab",
    "form\x0cfeed",
    "file\x1csep",
    "tab\tname",
    "two  spaces",
    " leading",
    "trailing ",
    "Crème brûlée",
    "日本",
    "Ähre",
]


def test_labels_with_line_separators_tabs_and_accents_round_trip(tmp_path):
    path = export.write_labels(HOSTILE_NAMES, tmp_path / "labels.txt")
    assert export.read_labels(path) == HOSTILE_NAMES


def test_labels_written_on_windows_read_back(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("daisy\r\nline\u2028sep\r\n".encode())
    assert export.read_labels(path) == ["daisy", "line\u2028sep"]


@pytest.mark.parametrize(
    "names, message",
    [
        ([], "single-line"),
        (["ok", ""], "single-line"),
        (["two\nlines"], "single-line"),
        (["carriage\rreturn"], "single-line"),
        (["caf\udce9"], "not valid UTF-8"),  # a folder name in Latin-1, as os.listdir returns it
    ],
)
def test_write_labels_refuses_unusable_names(tmp_path, names, message):
    with pytest.raises(RetrainError, match=message) as raised:
        export.write_labels(names, tmp_path / "labels.txt")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "labels.txt").exists()
