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
    spec = importlib.util.spec_from_file_location("cache_memory",
                                                  ROOT / "benchmarks" / "cache_memory.py")
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
    from retrain import training_data
    from retrain.cache import BottleneckCache

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
        batches = training_data.cached_training(cache, chosen, 100, seed=0, shuffle_buffer=buffer)
        assert batches.options().autotune.enabled is False  # see retrain.tf_data
        vectors, labels = map(np.concatenate, zip(*[(x.numpy(), y.numpy())
                                                    for x, y in batches.take(len(chosen) // 100)]))
        assert len(vectors) == len(chosen)
        assert len({vector.tobytes() for vector in vectors}) == len(chosen)
        assert all(rows[vector.tobytes()] == label for vector, label in zip(vectors, labels))
        assert [rows[v.tobytes()] for v in vectors[:50]] != [e.label_index for e in chosen[:50]]
