"""Training on a cache bigger than a memory budget: the vectors stream, they are never all loaded.

A synthetic cache (the real format, written by the cache's own journal and
fold) holds 586 MB of vectors as float32; a fresh process trains the head on
all of it for more than one pass and must stay within 250 MB of its resident
memory just before training. Reading the cache whole would exceed that by far.
"""

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROWS = 120_000
BUDGET_MB = 250


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "cache_memory", ROOT / "benchmarks" / "cache_memory.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_on_a_cache_bigger_than_the_memory_budget(tmp_path):
    benchmark = load_benchmark()
    path = benchmark.write_synthetic_cache(tmp_path, ROWS)
    vectors_mb = ROWS * benchmark.FEATURE_DIM * 4 / 2**20
    assert vectors_mb > 2 * BUDGET_MB and path.stat().st_size > 2**20 * BUDGET_MB
    # 300 steps of 512 vectors: more than one pass over the 117,600 training rows.
    report = benchmark.train_child(tmp_path, ROWS, steps=300, batch_size=512, shuffle_buffer=8192)
    assert report["peak_rss_mb"] - report["baseline_rss_mb"] < BUDGET_MB, report
    assert report["val_accuracy"] > 0.9, report  # it did learn from the streamed vectors


def test_stream_and_training_batches_cover_every_entry_with_its_label(tmp_path):
    from retrain.cache import BottleneckCache
    from retrain.training import datasets

    benchmark = load_benchmark()
    benchmark.write_synthetic_cache(tmp_path, 3000)
    cache = BottleneckCache(tmp_path, "efficientnet_lite0")
    chosen = benchmark.entries(3000)[::3]  # rows scattered over the file's blocks
    expected = cache.read(chosen)
    seen = []
    for positions, vectors in cache.stream(chosen, block_rows=256, order_seed=1):
        np.testing.assert_array_equal(vectors, expected[positions])
        seen.extend(positions)
    assert sorted(seen) == list(range(len(chosen)))
    assert seen != sorted(seen)  # the blocks came in a shuffled order

    # One epoch of training batches, streamed (a buffer of one keeps epochs
    # apart) and read at once (all 1,000 fit in the buffer).
    rows = {vector.tobytes(): entry.label_index for vector, entry in zip(expected, chosen)}
    for buffer in (1, len(chosen)):
        batches = datasets.cached_training(cache, chosen, 100, seed=0, shuffle_buffer=buffer)
        assert batches.options().autotune.enabled is False  # see retrain.data.pixel_batches
        vectors, labels = map(
            np.concatenate,
            zip(*[(x.numpy(), y.numpy()) for x, y in batches.take(len(chosen) // 100)]),
        )
        assert len(vectors) == len(chosen)
        assert len({vector.tobytes() for vector in vectors}) == len(chosen)
        assert all(rows[vector.tobytes()] == label for vector, label in zip(vectors, labels))
        assert [rows[v.tobytes()] for v in vectors[:50]] != [e.label_index for e in chosen[:50]]


def test_predictions_and_the_validation_sample_read_a_bounded_part_of_the_cache(
    tmp_path, monkeypatch, caplog
):
    from retrain.cache import BottleneckCache
    from retrain.training import datasets, predict
    from retrain.training.head import build_head

    benchmark = load_benchmark()
    benchmark.write_synthetic_cache(tmp_path, 3000)
    cache = BottleneckCache(tmp_path, "efficientnet_lite0")
    chosen = benchmark.entries(3000)[::-7]  # scattered rows, not in file order
    head = build_head(benchmark.FEATURE_DIM, 3)
    expected = predict.predict(head, cache.read(chosen), -1)

    read_sizes = []
    stream = BottleneckCache.stream

    def recorded(self, entries, **options):
        for positions, vectors in stream(self, entries, **options):
            read_sizes.append(len(vectors))
            yield positions, vectors

    monkeypatch.setattr(BottleneckCache, "stream", recorded)
    found = predict.predict_cached(head, cache, chosen, -1, block_rows=512)
    np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-7)
    assert len(read_sizes) > 1 and max(read_sizes) <= 512 // 7 + 1
    assert predict.predict_cached(head, cache, [], -1).shape == (0, 3)

    # validation_batch_size -1: all of a small set in order, a seeded sample of a large one.
    labels = np.array([entry.label_index for entry in chosen])
    vectors, sample_labels = datasets.cached_sample(cache, chosen, -1, seed=0)
    np.testing.assert_array_equal(vectors, cache.read(chosen))
    np.testing.assert_array_equal(sample_labels, labels)
    assert "validation images" not in caplog.text
    vectors, sample_labels = datasets.cached_sample(cache, chosen, -1, seed=0, most=100)
    assert (
        f"{len(chosen)} validation images: the head is scored on a fixed random 100" in caplog.text
    )
    assert vectors.shape == (100, benchmark.FEATURE_DIM)
    rows = {vector.tobytes(): i for i, vector in enumerate(cache.read(chosen))}
    positions = [rows[vector.tobytes()] for vector in vectors]
    assert positions == sorted(positions) and list(labels[positions]) == list(sample_labels)
    assert len(datasets.cached_sample(cache, chosen, 200, seed=0, most=100)[0]) == 200
