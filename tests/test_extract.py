"""The extraction pipeline's engine thread (retrain/engines/extraction.py)."""

import threading

import numpy as np
import pytest
from PIL import Image
from skimage import data

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
    assert not engine_threads()
    # At most the queued batches and the one in the engine ran ahead.
    assert len(calls) <= 2 + extraction._QUEUED
