"""The int8 LiteRT engine (--engine litert-int8): fixed calibration, its check, its cache, fallback.

The calibration set is fixed (the same pixels on every machine, checked by
digest); two conversions give bit-identical vectors; the vectors stay close
to Keras's; the int8 cache file never mixes with float rows; a conversion
whose quantization or check fails falls back to float LiteRT, and the
failure is remembered.
"""

import hashlib
import logging
import shutil

import h5py
import keras
import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain import backbones, engines
from retrain.cache import BottleneckCache
from retrain.data import decode, images, resizing
from retrain.engines import check, int8

LITE0 = "efficientnet_lite0"
REAL_CONVERT = int8.convert


@pytest.fixture(scope="module")
def lite0():
    return backbones.load(LITE0, include_top=False)


@pytest.fixture(scope="module")
def int8_engine(lite0):
    """Lite0 converted to int8 once for the module (under the session's RETRAIN_HOME)."""
    return engines.build(int8.ENGINE, LITE0, model=lite0)


@pytest.fixture(scope="module")
def photo_pixels():
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    return np.stack([resizing.resize_to_input(p, 224) for p in photos])


@pytest.fixture
def photo_dir(tmp_path):
    root = tmp_path / "photos"
    for name, photo in (("cats", data.chelsea()), ("cups", data.coffee())):
        (root / name).mkdir(parents=True)
        Image.fromarray(photo).save(root / name / "a.jpg")
        Image.fromarray(photo[:, ::-1]).save(root / name / "b.jpg")
    return root


def test_the_calibration_set_is_fixed():
    first, again = int8.calibration_pixels(224), int8.calibration_pixels(224)
    assert first.shape == (int8.CALIBRATION_IMAGES, 224, 224, 3) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    digest = hashlib.sha256(first.astype(np.uint8).tobytes()).hexdigest()
    assert digest == int8.CALIBRATION_DIGEST[224]
    # Real, varied photos: not a constant or a repeated image.
    assert first.std() > 40 and len({hashlib.sha256(p.tobytes()).digest() for p in first}) > 100


def test_int8_vectors_are_close_to_keras_and_identical_across_conversions(
    lite0, int8_engine, photo_pixels, tmp_path, monkeypatch
):
    assert int8_engine.name == int8.ENGINE and int8_engine.batch_size == engines.LITERT_BATCH
    similarity = int8.cosines(
        engines.KerasEngine(lite0, 224)(photo_pixels), int8_engine(photo_pixels)
    )
    assert similarity.min() >= 0.95, similarity
    record = check.read_record(int8_engine.path)
    assert record["passed"] and record["median_cosine"] >= int8.MIN_MEDIAN_COSINE
    assert f"-int8c{int8.CALIBRATION_VERSION}-" in int8_engine.path.name
    # A second conversion on another "machine" (home folder).
    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path / "home"))
    again = engines.build(int8.ENGINE, LITE0, model=lite0)
    assert again.path != int8_engine.path
    calibration = int8.calibration_pixels(224)
    np.testing.assert_array_equal(again(calibration), int8_engine(calibration))


def test_the_int8_cache_never_mixes_with_float_rows(tmp_path, photo_dir, int8_engine):
    found = images.discover(photo_dir)
    by_int8 = BottleneckCache(tmp_path, LITE0, engine=engines.choose(int8.ENGINE, LITE0))
    by_float = BottleneckCache(tmp_path, LITE0, engine=engines.choose("litert", LITE0))
    assert by_int8.path != by_float.path and "-litert-int8c1-" in by_int8.path.name
    report = by_int8.update(found, progress=False)
    assert (report.engine, report.extracted) == (int8.ENGINE, 4)
    report = by_float.update(found, progress=False)
    assert (report.engine, report.extracted, report.reused) == ("litert", 4, 0)
    with h5py.File(by_int8.path) as file:
        assert file.attrs["engine"] == int8.identity_name()
    # Close, not equal: the rows are the engines' own.
    close = int8.cosines(by_float.read(found.entries), by_int8.read(found.entries))
    assert close.min() > 0.9 and not np.array_equal(
        by_float.read(found.entries), by_int8.read(found.entries)
    )


def _wrong_network(model, size, batch):
    """A real int8 conversion of another network with the same shapes (a failing check)."""
    wrong = keras.Sequential(
        [keras.Input((224, 224, 3)), keras.layers.AveragePooling2D(28), keras.layers.Flatten()]
    )
    wrong = keras.Sequential([wrong, keras.layers.Dense(1280)])
    return REAL_CONVERT(wrong, size, batch)


@pytest.mark.parametrize("failure", ["calibration set changed", "check fails"])
def test_a_failed_conversion_falls_back_to_float_litert_and_is_remembered(
    failure, tmp_path, photo_dir, lite0, monkeypatch, caplog
):
    float_engine = engines.build("litert", LITE0, model=lite0)  # the session's conversion
    home = tmp_path / "home"
    (home / "backbones").mkdir(parents=True)
    monkeypatch.setenv("RETRAIN_HOME", str(home))
    for source in (float_engine.path, check.record_path(float_engine.path)):
        shutil.copy(source, home / "backbones" / source.name)
    if failure == "calibration set changed":
        monkeypatch.setitem(int8.CALIBRATION_DIGEST, 224, "0" * 64)
    else:
        monkeypatch.setattr(int8, "convert", _wrong_network)
    cache = BottleneckCache(tmp_path / "cache", LITE0, engine=engines.choose(int8.ENGINE, LITE0))
    with caplog.at_level(logging.WARNING):
        report = cache.update(images.discover(photo_dir), progress=False)
    assert (report.engine, report.extracted) == ("litert", 4)
    expected = "came out different" if failure == "calibration set changed" else "cosine"
    assert expected in caplog.text
    assert f"-litert-{decode.pixel_settings_id()}-" in report.path.name
    assert not list((home / "backbones").glob("*int8*.tflite")), "failed file kept"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert engines.resolve(int8.ENGINE, LITE0) == "litert"
    assert "failed the check against Keras" in caplog.text
