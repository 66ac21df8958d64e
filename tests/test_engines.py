"""Inference engines (retrain/engines/) and the cache identity they are part of."""

import logging

import h5py
import keras
import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain import backbones, engines
from retrain.cache import BottleneckCache
from retrain.data import decode, images, resizing
from retrain.engines import check
from retrain.engines import litert as litert_lib
from retrain.errors import RetrainError

pytestmark = pytest.mark.skipif(
    not engines.runtime_available(), reason="ai-edge-litert is not installed"
)


@pytest.fixture(scope="module")
def lite0():
    """The Keras Lite0 backbone, built once; backbones.load returns it too."""
    model = backbones.load("efficientnet_lite0")
    real_load = backbones.load
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            backbones,
            "load",
            lambda name, include_top=False, weights_file=None: (
                model
                if (name, include_top) == ("efficientnet_lite0", False)
                else real_load(name, include_top, weights_file)
            ),
        )
        yield model


@pytest.fixture(scope="module")
def litert(lite0):
    """Lite0 converted once for the session (kept under the session's RETRAIN_HOME)."""
    return engines.build("litert", "efficientnet_lite0", model=lite0)


@pytest.fixture(scope="module")
def photo_pixels():
    """scikit-image's photos at 224, float32 [4, 224, 224, 3] in [0, 255]."""
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    return np.stack([resizing.resize_to_input(p, 224) for p in photos])


def test_litert_agrees_with_keras_on_photos(lite0, litert, photo_pixels):
    assert isinstance(litert, engines.LiteRTEngine) and litert.batch_size == engines.LITERT_BATCH
    reference = engines.KerasEngine(lite0, 224)
    deviation = engines.compare(reference, litert, photo_pixels)
    assert deviation <= engines.TOLERANCE
    vectors = litert(photo_pixels)
    assert vectors.dtype == np.float32 and vectors.shape == (4, 1280)
    # Different photos give clearly different vectors: the check is not vacuous.
    assert engines.compare(reference, lambda p: reference(p[::-1]), photo_pixels) > 0.1
    record = check.read_record(litert.path)
    assert record["passed"] and record["max_relative_deviation"] <= engines.TOLERANCE


def test_litert_takes_any_batch_size(litert, photo_pixels):
    one_by_one = np.concatenate([litert(p[None]) for p in photo_pixels])
    eleven = np.concatenate([photo_pixels] * 3)[:11]  # full chunks and a zero-padded rest
    # Bit for bit: a vector does not depend on the images beside it in a call.
    np.testing.assert_array_equal(litert(eleven), np.concatenate([one_by_one] * 3)[:11])
    assert litert(photo_pixels[:0]).shape == (0, 1280)


def test_converted_file_is_reused_without_converting(litert, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(litert_lib, "convert_backbone", no_conversion)
    monkeypatch.setattr(backbones, "load", no_conversion)
    again = engines.build("litert", "efficientnet_lite0")
    assert again.path == litert.path


def test_failed_check_falls_back_to_keras_and_is_remembered(tmp_path, lite0, monkeypatch, caplog):
    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path / "home"))
    # A wrong conversion: a real flatbuffer, of another network with the same shapes.
    wrong = keras.Sequential(
        [
            keras.Input((224, 224, 3)),
            keras.layers.AveragePooling2D(28),
            keras.layers.Flatten(),
            keras.layers.Dense(1280),
        ]
    )
    real_convert = litert_lib.convert_backbone
    monkeypatch.setattr(
        litert_lib, "convert_backbone", lambda model, size, batch: real_convert(wrong, size, batch)
    )
    root = tmp_path / "photos"
    for name, photo in (("cats", data.chelsea()), ("cups", data.coffee())):
        (root / name).mkdir(parents=True)
        Image.fromarray(photo).save(root / name / "a.jpg")
    found = images.discover(root)
    cache = BottleneckCache(
        tmp_path / "cache",
        "efficientnet_lite0",
        engine=engines.choose("litert", "efficientnet_lite0"),
    )
    assert cache.engine_name == "litert"
    with caplog.at_level(logging.WARNING):
        report = cache.update(found, progress=False)
    assert "does not reproduce the Keras vectors" in caplog.text
    assert (report.engine, report.extracted) == ("keras", 2)
    assert "-keras-" in report.path.name and report.path.is_file()
    assert not list((tmp_path / "home" / "backbones").glob("*.tflite")), "bad file kept"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert engines.resolve("auto", "efficientnet_lite0") == "keras"
        assert caplog.text == ""
        assert engines.resolve("litert", "efficientnet_lite0") == "keras"
    assert "failed the check against Keras" in caplog.text


def test_missing_runtime_or_bad_name(monkeypatch, caplog):
    monkeypatch.setattr(engines, "runtime_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert engines.resolve("auto", "efficientnet_lite0") == "keras"
        assert caplog.text == ""
        assert engines.resolve("litert", "efficientnet_lite0") == "keras"
    assert "ai-edge-litert runtime is not installed" in caplog.text
    with pytest.raises(RetrainError, match="Received: engine='tpu'"):
        engines.resolve("tpu", "efficientnet_lite0")


def test_gpu_makes_auto_choose_keras(monkeypatch):
    monkeypatch.setattr(engines, "gpu_available", lambda: True)
    assert engines.resolve("auto", "efficientnet_lite0") == "keras"
    assert engines.resolve("litert", "efficientnet_lite0") == "litert"


@pytest.fixture
def photo_dir(tmp_path):
    """Four full-size photos (JPEG, so draft decoding applies) in two classes."""
    root = tmp_path / "photos"
    for i, photo in enumerate([data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(folder / f"{i}.jpg", quality=95)
    return root


def rows(path):
    with h5py.File(path) as file:
        return {
            key: vector
            for key, vector in zip(file["images/key"][()], file["images/bottleneck"][()])
        }


def test_changed_engine_gives_a_new_cache_file(tmp_path, photo_dir, lite0, litert):
    found = images.discover(photo_dir)
    by_keras = BottleneckCache(
        tmp_path, "efficientnet_lite0", engine=engines.choose("keras", "efficientnet_lite0")
    )
    by_litert = BottleneckCache(
        tmp_path, "efficientnet_lite0", engine=engines.choose("litert", "efficientnet_lite0")
    )
    assert by_keras.path != by_litert.path
    assert by_keras.update(found, progress=False).extracted == 4
    keras_rows = rows(by_keras.path)
    report = by_litert.update(found, progress=False)
    assert (report.extracted, report.reused, report.engine) == (4, 0, "litert")
    assert by_keras.update(found, progress=False).extracted == 0
    after = rows(by_keras.path)
    assert after.keys() == keras_rows.keys()
    assert all(np.array_equal(after[k], keras_rows[k]) for k in after), "keras rows changed"
    with h5py.File(by_litert.path) as file:
        assert file.attrs["engine"] == "litert"
        assert file.attrs["pixels"] == decode.pixel_settings_id()
    np.testing.assert_allclose(
        by_litert.read(found.entries), by_keras.read(found.entries), rtol=2e-3, atol=2e-3
    )


def test_changed_decode_setting_gives_a_new_cache_file(tmp_path, photo_dir, lite0, monkeypatch):
    found = images.discover(photo_dir)
    before = BottleneckCache(tmp_path, "efficientnet_lite0")
    before.update(found, progress=False)
    old_rows = rows(before.path)
    monkeypatch.setitem(decode.PIXEL_SETTINGS, "jpeg_draft_margin", 1)
    after = BottleneckCache(tmp_path, "efficientnet_lite0")
    assert after.path != before.path and after.identity.pixels != before.identity.pixels
    assert after.update(found, progress=False).extracted == 4
    assert all(np.array_equal(v, old_rows[k]) for k, v in rows(before.path).items())
    # The 512-pixel astronaut decodes at half scale with margin 1: other vectors.
    changed = np.abs(after.read(found.entries) - before.read(found.entries)).max(axis=1)
    assert changed.max() > 0.01
