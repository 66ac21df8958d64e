"""One --bottleneck_dir shared by image folders whose relative paths collide.

The cache key is a hash of the relative path, so ``cat/001.png`` of folder A
and of folder B share a row. A row records the image folder it was extracted
from: the vector is reused on (size, mtime) only for that folder; elsewhere
the content digest decides (a copied or moved folder costs a digest pass,
never an extraction).
"""

import os
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain.cache import BottleneckCache, journal, plan
from retrain.data import images

LITE0 = "efficientnet_lite0"
MTIME_NS = 1_600_000_000_123_456_789


def stored_png(pixels, path):
    """An uncompressed PNG: its size depends only on the picture's dimensions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, compress_level=0)
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return path


@pytest.fixture
def two_folders(tmp_path):
    """Folders A and B: ``cat/001.png`` different pictures of one byte length and
    one mtime; ``dog/002.png`` the same file in both (a copy)."""
    cat_a, cat_b = data.chelsea()[:160, :200], data.coffee()[:160, :200]
    dog = data.astronaut()[:160, :200]
    for name, cat in (("A", cat_a), ("B", cat_b)):
        stored_png(cat, tmp_path / name / "cat" / "001.png")
        stored_png(dog, tmp_path / name / "dog" / "002.png")
    a, b = (tmp_path / name / "cat" / "001.png" for name in "AB")
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
    assert a.stat().st_mtime_ns == b.stat().st_mtime_ns
    return tmp_path / "A", tmp_path / "B"


def alone(image_dir, folder):
    """The vectors of ``image_dir`` from a cache built from it alone."""
    found = images.discover(image_dir)
    cache = BottleneckCache(folder, LITE0)
    cache.update(found, batch_size=2, progress=False)
    return cache.read(found.entries)


def test_a_shared_cache_never_feeds_one_folders_vector_to_another(
    tmp_path, two_folders, backbone_builds
):
    folder_a, folder_b = two_folders
    expected = {
        name: alone(path, tmp_path / f"alone-{name}")
        for name, path in (("A", folder_a), ("B", folder_b))
    }
    assert not np.allclose(expected["A"][0], expected["B"][0])
    shared = BottleneckCache(tmp_path / "shared", LITE0)

    for name, folder, extracted in (("A", folder_a, 2), ("B", folder_b, 1), ("A", folder_a, 1)):
        found = images.discover(folder)
        report = shared.update(found, batch_size=2, progress=False)
        # The copied dog/002.png is digested and kept, never extracted again.
        assert (report.extracted, report.reused) == (extracted, 2 - extracted), name
        assert np.array_equal(shared.read(found.entries), expected[name]), name
    assert shared.plan(images.discover(folder_a), progress=False).reused == 2


def test_a_moved_image_folder_costs_a_digest_pass_not_an_extraction(
    tmp_path, two_folders, backbone_builds
):
    folder_a, _ = two_folders
    cache = BottleneckCache(tmp_path / "cache", LITE0)
    before = cache.update(images.discover(folder_a), batch_size=2, progress=False)
    moved = shutil.move(folder_a, tmp_path / "moved")
    found = images.discover(moved)
    counted = cache.plan(found, progress=False)
    assert (len(counted.todo), len(counted.touched)) == (0, 2)
    report = cache.update(found, batch_size=2, progress=False)
    assert (before.extracted, report.extracted, report.reused) == (2, 0, 2)
    # Re-recorded under the new folder: the next plan reuses on (size, mtime).
    assert cache.plan(found, progress=False).reused == 2
    with h5py.File(cache.path, "r") as file:
        assert set(file["images/folder"][()]) == {plan.folder_id(moved).encode()}


def strip_folders(cache_path):
    """Makes ``cache_path`` look written before folders were recorded."""
    with h5py.File(cache_path, "a") as file:
        del file["images/folder"]
        del file["failed/folder"]


def test_a_cache_written_before_folders_is_reused_after_one_digest_pass(
    tmp_path, two_folders, backbone_builds
):
    folder_a, folder_b = two_folders
    cache = BottleneckCache(tmp_path / "cache", LITE0)
    found_a = images.discover(folder_a)
    cache.update(found_a, batch_size=2, progress=False)
    vectors = cache.read(found_a.entries)
    strip_folders(cache.path)

    assert cache.plan(found_a, progress=False).reused == 0  # unknown folder: digests decide
    report = cache.update(found_a, batch_size=2, progress=False)
    assert (report.extracted, report.reused) == (0, 2)
    assert np.array_equal(cache.read(found_a.entries), vectors)
    assert cache.plan(found_a, progress=False).reused == 2

    strip_folders(cache.path)
    found_b = images.discover(folder_b)
    report = cache.update(found_b, batch_size=2, progress=False)
    assert (report.extracted, report.reused) == (1, 1)
    assert np.array_equal(cache.read(found_b.entries), alone(folder_b, tmp_path / "b"))


def test_shard_files_written_before_folders_still_merge(tmp_path, two_folders, backbone_builds):
    folder_a, _ = two_folders
    found = images.discover(folder_a)
    cache = BottleneckCache(tmp_path / "cache", LITE0)
    report = cache.update_shard(found, 1, 0, batch_size=2, progress=False)
    (shard,) = report.shard_files
    with np.load(shard) as archive:
        arrays = {name: archive[name] for name in archive.files}
    assert set(arrays["folder"]) == {plan.folder_id(folder_a).encode()}
    del arrays["folder"], arrays["failed_folder"]
    np.savez(shard, **arrays)
    assert journal.folders(arrays).tolist() == [b"", b""]

    merged = cache.update(found, batch_size=2, progress=False)
    assert (merged.merged, merged.extracted, merged.reused) == (1, 0, 2)
    assert np.array_equal(cache.read(found.entries), alone(folder_a, tmp_path / "a"))
