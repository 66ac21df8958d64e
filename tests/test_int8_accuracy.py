"""benchmarks/int8_accuracy.py: the cosine of two caches' vectors matched by key, in bounded blocks."""

import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import int8_accuracy  # noqa: E402  (a benchmark's module, not retrain's)


def write_cache(path, keys, vectors):
    """A cache file with the two datasets the benchmark reads (store.py's layout)."""
    with h5py.File(path, "w") as file:
        file["images/key"] = np.array(keys, dtype="S64")
        file["images/bottleneck"] = vectors.astype(np.float16)
    return path


def test_cosines_match_rows_by_key_across_blocks(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    keys = [f"{n:064x}".encode() for n in range(50)]
    a = rng.normal(size=(50, 16)).astype(np.float32)
    b = a + rng.normal(scale=0.3, size=a.shape).astype(np.float32)
    b[7] = -a[7]  # one image whose vectors point opposite ways
    kept = np.array([n for n in range(50) if n not in (3, 20, 21, 40, 49)])
    order = rng.permutation(kept)  # the other file: shuffled, 5 images missing, 1 extra
    extra = rng.normal(size=(1, 16))
    write_cache(tmp_path / "a.h5", keys, a)
    write_cache(
        tmp_path / "b.h5", [keys[i] for i in order] + [b"f" * 64], np.vstack([b[order], extra])
    )
    monkeypatch.setattr(int8_accuracy, "_BLOCK", 4)  # many blocks, each out of order in b.h5

    got = int8_accuracy.cosines(tmp_path / "a.h5", tmp_path / "b.h5")

    a16, b16 = a.astype(np.float16).astype(np.float64), b.astype(np.float16).astype(np.float64)
    expected = np.einsum("ij,ij->i", a16[kept], b16[kept]) / (
        np.linalg.norm(a16[kept], axis=1) * np.linalg.norm(b16[kept], axis=1)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12)  # in the reference file's order
    assert got[list(kept).index(7)] < -0.999
