"""--onnx: OUTPUT_DIR/model.onnx from a run on real photos, checked against Keras, run by
label_image with ONNX Runtime; hostile .onnx files refused with one line."""

import contextlib
import importlib.util
import io
import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnxruntime) is not installed")
pytest.importorskip("tf2onnx", reason="the [onnx] extra (tf2onnx) is not installed")
onnx = pytest.importorskip("onnx", reason="the [onnx] extra (onnx) is not installed")

from onnx import TensorProto, helper  # noqa: E402

from retrain import cli, export, label_image  # noqa: E402
from retrain.data import decode, resizing  # noqa: E402
from retrain.errors import RetrainError  # noqa: E402
from retrain.export import loaders, onnx_export, onnx_file, unknown_graph  # noqa: E402

SIZE = 224


@pytest.fixture(scope="module")
def onnx_run(photo_model, tmp_path_factory):
    """A run with --onnx on the 18 photo variants: its output folder (its stdout in
    the file stdout.txt beside it)."""
    root = tmp_path_factory.mktemp("onnx_run")
    argv = ["--image_dir", str(photo_model["photos"]), "--bottleneck_dir", str(root / "cache")]
    argv += ["--output_dir", str(root / "out"), "--how_many_training_steps", "30"]
    argv += ["--testing_percentage", "20", "--no-report", "--onnx"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert cli.main(argv) == 0
    (root / "stdout.txt").write_text(stdout.getvalue())
    return root / "out"


def photo_pixels(photo_model):
    """(paths, float32 [18, 224, 224, 3]) of the photo variants, resized as extraction does."""
    paths = sorted(photo_model["photos"].glob("*/*.png"))
    pixels = [
        resizing.resize_to_input(decode.decode_rgb(path, target_size=SIZE), SIZE) for path in paths
    ]
    return paths, np.stack(pixels).astype(np.float32)


def test_run_writes_an_onnx_file_matching_the_keras_model(onnx_run, photo_model):
    model = onnx.load(str(onnx_run / "model.onnx"))
    metadata = onnx_file.metadata(model)
    assert json.loads(metadata["labels"]) == photo_model["names"]
    assert metadata["retrain_version"]
    assert [value.name for value in model.graph.input] == ["pixels"]
    assert [value.name for value in model.graph.output] == ["probabilities", "unknown_score"]
    _, pixels = photo_pixels(photo_model)
    keras_model = loaders.load_pixel_classifier(str(onnx_run / "model.keras"))
    onnx_model = loaders.load_pixel_classifier(str(onnx_run / "model.onnx"))
    assert onnx_model.class_names == photo_model["names"]
    assert onnx_model.unknown_threshold == pytest.approx(keras_model.unknown_threshold)
    assert float(metadata["unknown_threshold"]) == keras_model.unknown_threshold
    expected, actual = keras_model.predict_scored(pixels), onnx_model.predict_scored(pixels)
    # The stated tolerance holds on every photo of the run, for probabilities and scores.
    np.testing.assert_allclose(actual[0], expected[0], rtol=0, atol=onnx_export.TOLERANCE)
    np.testing.assert_allclose(actual[1], expected[1], rtol=0, atol=onnx_export.TOLERANCE)
    out = (onnx_run.parent / "stdout.txt").read_text()
    assert f"Saved ONNX model {onnx_run / 'model.onnx'} (" in out


def test_label_image_onnx_gives_the_keras_top_labels(onnx_run, photo_model, capsys):
    paths = [str(path) for path in photo_pixels(photo_model)[0]]
    results = {}
    for graph in ("model.keras", "model.onnx"):
        argv = ["--graph", str(onnx_run / graph), "--labels", str(onnx_run / "labels.txt")]
        assert label_image.main([*argv, "--json", "--image", *paths]) == 0
        document = json.loads(capsys.readouterr().out)
        results[graph] = {
            r["image"]: [(p["label"], p["score"]) for p in r["predictions"]]
            for r in document["results"]
        }
    for path in paths:
        keras_top, onnx_top = results["model.keras"][path][0], results["model.onnx"][path][0]
        assert onnx_top[0] == keras_top[0], path
        assert onnx_top[1] == pytest.approx(keras_top[1], abs=onnx_export.TOLERANCE)


@pytest.fixture(scope="module")
def other_model(photo_model):
    """The session's photo classifier, fixed-size: same backbone, another head than the run's."""
    return export.fixed_size_classifier(export.load_classifier(photo_model["graph"]))


def test_a_corrupted_onnx_file_fails_the_check_loudly(onnx_run, photo_model, other_model):
    from retrain.export import keras_file

    keras_model = keras_file.load_classifier(str(onnx_run / "model.keras"))
    fixed = export.fixed_size_classifier(keras_model)
    model = onnx.load(str(onnx_run / "model.onnx"))
    pixels = photo_pixels(photo_model)[1][::3]  # two of each class
    # The right file agrees: the measured difference is far below the tolerance.
    single = onnx.load(str(onnx_run / "model.onnx"))
    single.graph.output.pop()  # the classifier without the score, as `fixed` has
    assert onnx_export.check_agreement(fixed, single.SerializeToString(), pixels, "m") < 1e-5
    # Its logits bias corrupted (a few bits flipped in transit, say): refused, measured.
    bias = max(
        (tensor for tensor in model.graph.initializer if list(tensor.dims) == [3]),
        key=lambda tensor: tensor.name,
    )
    values = onnx.numpy_helper.to_array(bias) + np.array([4.0, -4.0, 0.0], np.float32)
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    model.graph.output.pop()
    with pytest.raises(RetrainError, match=r"model\.onnx does not match the Keras model") as error:
        onnx_export.check_agreement(fixed, model.SerializeToString(), pixels, "out/model.onnx")
    assert "largest difference" in str(error.value) and "\n" not in str(error.value)
    # Another network's file (a wrong model) fails too.
    with pytest.raises(RetrainError, match="tolerance 0.0001"):
        onnx_export.check_agreement(other_model, single.SerializeToString(), pixels, "m.onnx")


def test_a_disagreeing_conversion_writes_no_file(onnx_run, photo_model, other_model, tmp_path):
    """save_onnx checks before it writes: the run's conversion offered for another model."""
    run_model = onnx.load(str(onnx_run / "model.onnx"))
    run_model.graph.output.pop()
    del run_model.metadata_props[:]
    _, pixels = photo_pixels(photo_model)
    target = tmp_path / "model.onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "convert", lambda fixed, path: run_model)
        with pytest.raises(RetrainError, match="does not match the Keras model"):
            onnx_export.save_onnx(other_model, photo_model["names"], target, pixels[:4])
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_onnx_without_the_extra_exits_2_before_any_work(photo_model, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a)
    )
    argv = ["--image_dir", str(photo_model["photos"]), "--bottleneck_dir", str(tmp_path / "c")]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "out"), "--onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'retrain[onnx]'" in err and "tf2onnx" in err
    assert list(tmp_path.iterdir()) == []  # no cache, no output folder


def tiny_model(path, node=None, initializer=None, size=4, width=None):
    """A valid ONNX classifier of the shape retrain writes: pixels [n, size, size, 3] ->
    probabilities [n, 3] (a mean over pixels, then softmax), optionally with an extra
    node and initializer. Returns the path."""
    shape = ["batch", size, width or size, 3]
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)
    probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Softmax", ["mean"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes + ([node] if node else []),
        "tiny",
        [pixels],
        [probabilities],
        [initializer] if initializer is not None else [],
    )
    opsets = [helper.make_opsetid("", 15)]
    if node is not None and node.domain:
        opsets.append(helper.make_opsetid(node.domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_a_plain_onnx_classifier_loads_and_runs(tmp_path):
    loaded = loaders.load_pixel_classifier(str(tiny_model(tmp_path / "tiny.onnx")), unknown=False)
    assert (loaded.input_size, loaded.num_classes, loaded.unknown_threshold) == (4, 3, None)
    pixels = np.zeros((2, 4, 4, 3), np.float32)
    np.testing.assert_allclose(loaded.predict(pixels), np.full((2, 3), 1 / 3), atol=1e-6)


def external_tensor(location):
    tensor = helper.make_tensor("weights", TensorProto.FLOAT, [4], [0.0] * 4)
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def hostile_files(folder):
    """{name: (path, what the one-line refusal says)} of .onnx files made to hurt."""
    (folder / "garbage.onnx").write_bytes(np.random.default_rng(3).bytes(4096))
    (folder / "text.onnx").write_text("just some text, not a protobuf\n")
    os.mkfifo(folder / "fifo.onnx")
    with open(folder / "sparse.onnx", "wb") as handle:  # 2 GiB of holes: refused by its size
        handle.truncate(onnx_file.MAX_MODEL_BYTES + 1)
    custom = helper.make_node("Evil", ["mean"], ["unused"], domain="com.example.evil")
    return {
        "garbage": (folder / "garbage.onnx", "not a valid ONNX model"),
        "text": (folder / "text.onnx", "not a valid ONNX model"),
        "fifo": (folder / "fifo.onnx", "not a regular file"),
        "sparse": (folder / "sparse.onnx", "more than the"),
        "external": (
            tiny_model(folder / "external.onnx", initializer=external_tensor("../../etc/passwd")),
            "external data",
        ),
        "external inside": (
            tiny_model(folder / "inside.onnx", initializer=external_tensor("weights.bin")),
            "external data",
        ),
        "custom op": (tiny_model(folder / "custom.onnx", node=custom), "custom operator"),
        "not square": (
            tiny_model(folder / "wide.onnx", width=5),
            "not a classifier exported by retrain",
        ),
    }


def test_hostile_onnx_files_are_refused_with_one_line(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(bytes(16))
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for name, (path, reason) in hostile_files(tmp_path).items():
        with pytest.raises(RetrainError, match=reason) as error:
            loaders.load_pixel_classifier(str(path))
        assert str(path) in str(error.value) and "\n" not in str(error.value), name
        argv = ["--graph", str(path), "--labels", str(labels), "--image", str(image)]
        assert label_image.main(argv) == 2, name
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and reason in err, name


def test_a_bad_threshold_entry_is_refused(tmp_path):
    path = tiny_model(tmp_path / "tiny.onnx")
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "unknown_threshold", "nan"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(RetrainError, match="unknown_threshold metadata entry"):
        loaders.load_pixel_classifier(str(path))


def test_save_onnx_requires_the_detector_exactly_with_the_score(other_model, tmp_path):
    assert not unknown_graph.is_scored(other_model)
    with pytest.raises(ValueError, match="detector must be given"):
        onnx_export.save_onnx(other_model, ["a"], tmp_path / "m.onnx", [], detector=object())


def test_a_failing_conversion_is_one_line_and_writes_nothing(other_model, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("Unsupported ops: SomeOp\nsecond line")

    monkeypatch.setattr(other_model, "export", fail)
    target = tmp_path / "model.onnx"
    with pytest.raises(RetrainError, match="Cannot convert the model to ONNX") as error:
        onnx_export.save_onnx(other_model, ["a", "b", "c"], target, [])
    assert str(target) in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []
