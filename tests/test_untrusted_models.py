"""label_image --graph runs no code from a model file: hostile files crafted here.

Each hostile file is shown to be hostile first where that can be done safely
(Keras with safe mode off runs its Lambda, which writes a marker file), then
label_image must refuse it with one line on stderr and exit status 2, before
Keras opens it, and the marker must stay absent.
"""

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain import export, label_image
from retrain.backbones import keras_apps
from retrain.errors import RetrainError
from retrain.export import keras_file
from retrain.training.head import build_head, train_head
from retrain.training.settings import HeadSettings

SIZE = 16
NAMES = ["cat", "coffee"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real retrain export (build_classifier + a head trained by train_head) of a tiny backbone.

    Returns {"graph", "labels", "image"} paths.
    """
    root = tmp_path_factory.mktemp("untrusted")
    pixels = keras.Input((SIZE, SIZE, 3), name="pixels")
    features = keras.layers.Rescaling(1 / 128, offset=-127 / 128, name="normalize")(pixels)
    features = keras.layers.Conv2D(4, 3, name="conv")(features)
    features = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    backbone = keras.Model(pixels, features, name="tiny")
    rng = np.random.default_rng(0)
    vectors, labels = rng.normal(size=(12, 4)).astype(np.float32), np.arange(12) % 2
    trained = train_head(
        vectors[:8],
        labels[:8],
        vectors[8:],
        labels[8:],
        len(NAMES),
        HeadSettings(
            how_many_training_steps=4,
            learning_rate=0.01,
            train_batch_size=4,
            validation_batch_size=-1,
            eval_step_interval=2,
            seed=0,
            progress=False,
        ),
    )
    graph = export.save_classifier(
        export.build_classifier(backbone, trained.head, SIZE), root / "model.keras"
    )
    image = root / "cat.png"
    Image.fromarray(data.chelsea()).save(image)
    return {
        "graph": graph,
        "labels": export.write_labels(NAMES, root / "labels.txt"),
        "image": image,
    }


@pytest.fixture
def keras_never_loads(monkeypatch):
    """Fails the test if anything reaches keras.saving.load_model."""

    def load_model(*args, **kwargs):
        raise AssertionError("keras.saving.load_model was reached")

    monkeypatch.setattr(keras.saving, "load_model", load_model)


def label(graph, exported, capsys):
    status = label_image.main(
        [
            "--graph",
            str(graph),
            "--labels",
            str(exported["labels"]),
            "--image",
            str(exported["image"]),
        ]
    )
    out, err = capsys.readouterr()
    return status, out, err


def assert_refused(result, graph, *words):
    status, out, err = result
    assert (status, out) == (2, ""), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(graph) in err
    for word in words:
        assert word in err, err


def lambda_model(marker):
    """A model whose Lambda writes `marker` whenever Keras builds it; built here, marker removed."""
    writes = eval(f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]")  # noqa: S307
    pixels = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(pixels, keras.layers.Lambda(writes, name="evil")(pixels))
    marker.unlink()
    return model


def assert_hostile(path, marker):
    """Keras with safe mode off runs the file's Lambda: the file really is hostile."""
    keras.saving.load_model(path, compile=False, safe_mode=False)
    assert marker.read_text() == "ran"
    marker.unlink()


def test_a_retrain_export_loads_and_labels(exported, capsys):
    status, out, err = label(exported["graph"], exported, capsys)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == str(exported["image"]) and len(lines) == 1 + len(NAMES)
    assert sorted(line.split()[0] for line in lines[1:]) == NAMES


@pytest.mark.parametrize("name", ["model.h5", "model.keras"])
def test_a_legacy_h5_model_with_a_lambda_is_refused_and_runs_nothing(
    exported, tmp_path, capsys, name
):
    marker = tmp_path / "marker"
    legacy = tmp_path / "legacy.h5"
    lambda_model(marker).save(legacy)
    assert legacy.read_bytes()[:8] == keras_file.HDF5_SIGNATURE
    assert_hostile(legacy, marker)
    graph = tmp_path / name  # also under a .keras name: the content decides
    shutil.copyfile(legacy, graph)
    assert_refused(label(graph, exported, capsys), graph, "legacy HDF5 (.h5)")
    assert not marker.exists()


def test_a_keras_zip_with_a_lambda_is_refused_before_keras_opens_it(
    exported, tmp_path, capsys, monkeypatch
):
    marker = tmp_path / "marker"
    graph = tmp_path / "model.keras"
    lambda_model(marker).save(graph)
    assert zipfile.is_zipfile(graph)
    assert_hostile(graph, marker)
    monkeypatch.setattr(keras.saving, "load_model", lambda *a, **k: pytest.fail("Keras reached"))
    assert_refused(label(graph, exported, capsys), graph, "Lambda layer 'evil'")
    assert not marker.exists()


def objects(node, class_name):
    """Every dict of a config tree whose class_name is `class_name`, depth first."""
    if isinstance(node, dict):
        if node.get("class_name") == class_name:
            yield node
        node = list(node.values())
    for child in node if isinstance(node, list) else ():
        yield from objects(child, class_name)


def replace_conv(**fields):
    """An edit putting `fields` in place of the backbone's Conv2D (nested two models deep)."""

    def edit(config):
        conv = next(objects(config, "Conv2D"))
        conv.update(fields)

    return edit


def edit_first(class_name, edit):
    return lambda config: edit(next(objects(config, class_name)))


HOSTILE_CONFIGS = {
    "os.system": (
        replace_conv(module="os", class_name="system", config={"command": "touch x"}),
        "names os.system",
    ),
    "keras.utils.get_file (CVE-2025-8747)": (
        replace_conv(
            module="keras.utils",
            class_name="get_file",
            config={"origin": "http://127.0.0.1:9/x", "fname": "x"},
        ),
        "names keras.utils.get_file",
    ),
    "enable_unsafe_deserialization (CVE-2025-9906)": (
        edit_first(
            "Rescaling",
            lambda layer: layer["config"].update(
                dtype={
                    "module": "keras.config",
                    "class_name": "enable_unsafe_deserialization",
                    "config": {},
                    "registered_name": None,
                }
            ),
        ),
        "names keras.config.enable_unsafe_deserialization",
    ),
    "TFSMLayer (CVE-2026-1462)": (
        replace_conv(class_name="TFSMLayer", config={"filepath": "/tmp/x", "call_endpoint": "f"}),
        "names keras.layers.TFSMLayer",
    ),
    "StringLookup vocabulary file (CVE-2025-12058)": (
        replace_conv(class_name="StringLookup", config={"vocabulary": "/etc/passwd"}),
        "names keras.layers.StringLookup",
    ),
    "a registered name pointing elsewhere": (
        edit_first("Dense", lambda layer: layer.update(registered_name="evil>Dense")),
        "registers Dense as 'evil>Dense'",
    ),
    "an activation object": (
        edit_first(
            "Dense",
            lambda layer: layer["config"].update(
                activation={"module": "os", "class_name": "system", "config": "ls"}
            ),
        ),
        "activation",
    ),
    "an activation registered elsewhere": (
        edit_first("Dense", lambda layer: layer["config"].update(activation="evil>run")),
        "activation 'evil>run'",
    ),
    "a lambda inside an allowed layer": (
        edit_first(
            "Dense",
            lambda layer: layer["config"].update(
                kernel_initializer={
                    "class_name": "__lambda__",
                    "config": {"code": "", "defaults": None, "closure": None},
                }
            ),
        ),
        "Lambda layer",
    ),
    # Exports before issue 24 held the trained head, a compiled Sequential; Keras
    # deserializes a compile config even with compile=False.
    "the optimizer of a compile config": (
        lambda config: config.update(
            compile_config={
                "optimizer": {"module": "builtins", "class_name": "exec", "config": {}},
                "loss": None,
            }
        ),
        "names builtins.exec",
    ),
    "a module that is not a string": (replace_conv(module=["keras.layers"]), "names"),
    "a class name that breaks the line": (
        replace_conv(class_name="Conv2D\nsecond line"),
        "names keras.layers.Conv2D\\nsecond line",
    ),
}


def rewrite(source, target, edit=None, members=None, compression=zipfile.ZIP_STORED):
    """Copies the .keras zip `source` to `target`, editing config.json and/or the members."""
    with zipfile.ZipFile(source) as archive:
        contents = [(name, archive.read(name)) for name in archive.namelist()]
    if edit is not None:
        contents = [
            (
                name,
                json.dumps(_edited(json.loads(body), edit)).encode()
                if name == "config.json"
                else body,
            )
            for name, body in contents
        ]
    if members is not None:
        contents = members(contents)
    with zipfile.ZipFile(target, "w", compression=compression) as archive:
        for name, body in contents:
            archive.writestr(name, body)
    return target


def _edited(config, edit):
    edit(config)
    return config


@pytest.mark.parametrize("case", HOSTILE_CONFIGS)
def test_objects_outside_the_allowlist_are_refused(
    exported, tmp_path, capsys, keras_never_loads, case
):
    edit, message = HOSTILE_CONFIGS[case]
    graph = rewrite(exported["graph"], tmp_path / "model.keras", edit)
    assert_refused(label(graph, exported, capsys), graph, message)


def test_the_allowlist_admits_every_backbone_export():
    """The Keras applications retrain offers, wrapped as keras_apps.load wraps them, with a head."""
    for name, app in keras_apps.APPS.items():
        size = 75  # the smallest input every application accepts
        base = getattr(keras.applications, app.constructor)(
            include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
        )
        pixels = keras.Input((size, size, 3), name="pixels")
        normalized = keras.layers.Rescaling(app.scale, offset=app.offset, name="normalize")(pixels)
        backbone = keras.Model(pixels, base(normalized), name=name)
        head = build_head(backbone.output_shape[-1], 3, l2=1e-4)
        classifier = export.build_classifier(backbone, head, size)
        assert (
            keras_file.check_model_config(keras.saving.serialize_keras_object(classifier)) is None
        ), name


def members_without(name):
    return lambda contents: [(n, body) for n, body in contents if n != name]


def members_with(name, body):
    return lambda contents: contents + [(name, body)]


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the duplicate member is the point
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda path, source: path.write_bytes(b"not a zip at all"), "not a .keras zip archive"),
        (lambda path, source: path.write_bytes(b"PK\x03\x04 truncated zip"), "not a .keras zip"),
        (
            lambda path, source: rewrite(source, path, members=members_without("model.weights.h5")),
            "not exactly",
        ),
        (
            lambda path, source: rewrite(source, path, members=members_with("assets/x.txt", b"x")),
            "not exactly",
        ),
        (lambda path, source: rewrite(source, path, members=lambda c: c + c[:1]), "not exactly"),
        (
            lambda path, source: rewrite(
                source,
                path,
                members=lambda c: [(n, b"{" if n == "config.json" else body) for n, body in c],
            ),
            "is not JSON",
        ),
        (lambda path, source: os.mkfifo(path), "not a regular file"),
    ],
    ids=[
        "text",
        "truncated zip",
        "no weights",
        "extra member",
        "duplicate member",
        "bad JSON",
        "FIFO",
    ],
)
def test_files_that_are_not_keras_archives_are_refused(
    exported, tmp_path, capsys, keras_never_loads, make, message
):
    graph = tmp_path / "model.keras"
    make(graph, exported["graph"])
    assert_refused(label(graph, exported, capsys), graph, message)


def test_only_the_keras_suffix_is_loaded(exported, tmp_path, capsys, keras_never_loads):
    graph = tmp_path / "model.zip"
    shutil.copyfile(exported["graph"], graph)
    assert_refused(label(graph, exported, capsys), graph, "does not end in .keras")


def test_a_sparse_huge_file_is_refused_unread(exported, tmp_path, capsys, monkeypatch):
    graph = tmp_path / "model.keras"
    with open(graph, "wb") as handle:
        handle.truncate(keras_file.MAX_MODEL_BYTES + 1)
    monkeypatch.setattr(shutil, "copyfileobj", lambda *a: pytest.fail("the file was read"))
    assert_refused(label(graph, exported, capsys), graph, "at most")


def test_a_deflate_bomb_config_is_refused_from_its_header(
    exported, tmp_path, capsys, keras_never_loads
):
    bomb = b'{"padding": 1' + b" " * keras_file.MAX_CONFIG_BYTES + b"}"
    graph = rewrite(
        exported["graph"],
        tmp_path / "model.keras",
        compression=zipfile.ZIP_DEFLATED,
        members=lambda c: [(n, bomb if n == "config.json" else body) for n, body in c],
    )
    assert graph.stat().st_size < keras_file.MAX_CONFIG_BYTES // 100
    assert_refused(label(graph, exported, capsys), graph, "config.json expands to")


def test_the_total_uncompressed_size_is_bounded(
    exported, tmp_path, capsys, keras_never_loads, monkeypatch
):
    graph = rewrite(exported["graph"], tmp_path / "model.keras", compression=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(graph) as archive:
        total = sum(info.file_size for info in archive.infolist())
    assert graph.stat().st_size < total  # the file itself is within the bound below
    monkeypatch.setattr(keras_file, "MAX_MODEL_BYTES", total - 1)
    assert_refused(label(graph, exported, capsys), graph, f"expands to {total} bytes")


@pytest.mark.parametrize(
    "config",
    [
        "[" * 100_000 + "]" * 100_000,  # deeper than json's recursion limit
        '{"a": ' * (keras_file.MAX_CONFIG_DEPTH + 1)
        + "{}"
        + "}" * (keras_file.MAX_CONFIG_DEPTH + 1),
    ],
)
def test_deeply_nested_configs_are_refused(exported, tmp_path, capsys, keras_never_loads, config):
    graph = rewrite(
        exported["graph"],
        tmp_path / "model.keras",
        members=lambda c: [(n, config.encode() if n == "config.json" else body) for n, body in c],
    )
    assert_refused(label(graph, exported, capsys), graph, "config.json")


def test_a_keras_without_the_safe_mode_fixes_is_refused(exported, monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.11.2")
    with pytest.raises(RetrainError, match=r"Keras 3\.11\.2 .* pip install 'keras>=3\.15\.1'"):
        export.load_classifier(exported["graph"])


def test_setup_pins_the_keras_the_loader_requires():
    setup = (Path(__file__).parent.parent / "setup.cfg").read_text()
    [pinned] = re.findall(r"^\s*keras>=([\d.]+)\s*$", setup, flags=re.MULTILINE)
    assert tuple(map(int, pinned.split("."))) == keras_file.MIN_KERAS
    installed = tuple(map(int, re.match(r"(\d+)\.(\d+)\.(\d+)", keras.__version__).groups()))
    assert installed >= keras_file.MIN_KERAS
