"""The extraction pipeline's engine thread (retrain/engines/extraction.py)."""

import threading
import time

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain.data import pixel_batches
from retrain.engines import extraction


def channel_means(pixels):
    """A real (if weak) feature: float32 [b, 3] mean colour per image."""
    return np.asarray(pixels).mean(axis=(1, 2))


@pytest.fixture
def photo_paths(tmp_path):
    photos = [data.chelsea(), data.coffee(), data.astronaut()] * 4
    paths = []
    for i, photo in enumerate(photos):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(photo).save(paths[-1])
    paths.insert(5, tmp_path / "broken.jpg")
    paths[5].write_bytes(b"\xff\xd8\xff not really")
    return paths


def engine_threads():
    return [t for t in threading.enumerate() if t.name == "retrain-engine"]


def test_batches_in_order_with_failures(photo_paths):
    batches = list(extraction.bottleneck_batches(photo_paths, channel_means, 64, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 4, 1]
    positions = np.concatenate([b.positions for b in batches])
    assert positions.tolist() == [i for i in range(13) if i != 5]
    assert [f[0] for b in batches for f in b.failures] == [5]
    vectors = np.concatenate([b.bottlenecks for b in batches])
    # Same photo, same vector; the chelsea, coffee and astronaut means differ.
    np.testing.assert_allclose(vectors[0], vectors[3], rtol=1e-6)
    assert np.abs(vectors[0] - vectors[1]).max() > 1
    states = [s for b in batches for s in b.states]
    assert len(states) == 12 and all(len(s.sha256) == 64 for s in states)
    assert not engine_threads()


def test_engine_error_reaches_the_caller(photo_paths):
    def failing(pixels):
        raise ValueError("engine broke")

    with pytest.raises(ValueError, match="engine broke"):
        list(extraction.bottleneck_batches(photo_paths, failing, 64, batch_size=4))
    assert not engine_threads()


def test_stopping_early_stops_the_engine_thread(photo_paths):
    calls = []

    def counting(pixels):
        calls.append(len(pixels))
        return channel_means(pixels)

    batches = extraction.bottleneck_batches(photo_paths, counting, 64, batch_size=2)
    next(batches)
    batches.close()
    assert not engine_threads() and not decode_threads()
    # At most the queued batches and the one in the engine ran ahead.
    assert len(calls) <= 2 + extraction._QUEUED


def decode_threads():
    return [t for t in threading.enumerate() if t.name.startswith("retrain-decode")]


def test_numpy_batches_give_the_pixels_of_the_tf_data_pipeline(photo_paths):
    """The extraction feed (no tf.data) and image_batches make the same pixels and outcomes."""
    ours, theirs = {}, {}
    fed = list(pixel_batches.numpy_batches(photo_paths, 64, 4, ours, hash_files=True))
    reference = list(
        pixel_batches.image_batches(photo_paths, 64, 4, outcomes=theirs, hash_files=True)
    )
    assert len(fed) == len(reference) == 4
    for (index, pixels, ok), (want_index, want_pixels, want_ok) in zip(fed, reference):
        assert index.dtype == np.int64 and pixels.dtype == np.float32
        np.testing.assert_array_equal(index, want_index.numpy())
        np.testing.assert_array_equal(ok, want_ok.numpy())
        np.testing.assert_array_equal(pixels, want_pixels.numpy())
    assert ours == theirs
    assert ours[5].reason and len(ours[5].state.sha256) == 64  # broken.jpg, read whole


def test_numpy_batches_read_a_bounded_way_ahead_and_stop_when_closed(photo_paths):
    many = photo_paths * 10  # 130 images
    outcomes = {}
    batches = pixel_batches.numpy_batches(many, 64, 4, outcomes, workers=2)
    next(batches)
    time.sleep(1.0)  # time enough for a pool without a bound to read far ahead
    assert len(outcomes) <= (pixel_batches._BATCHES_AHEAD + 1) * 4
    batches.close()
    assert not decode_threads()
