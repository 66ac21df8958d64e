"""Disk space and the cache merge: the estimate, and a merge deferred when it cannot fit."""

import dataclasses
import logging
import os

import numpy as np
import pytest
from conftest import fill
from test_cache import photos, write
from test_faults import FAST

from retrain import cli
from retrain.cache import BottleneckCache, journal, merge, store
from retrain.cache.identity import CacheIdentity
from retrain.data import decode, images

LITE0 = "efficientnet_lite0"


def journal_rows(path, identity, count, failures=0):
    """``count`` journal rows with long non-ASCII relative paths (~190 utf-8 bytes)."""
    records = journal.Records()
    for i in range(count):
        name = f"Crème brûlée/{'sous-dossier très long/' * 7}{i:08d}.jpg"
        records.add_row(
            f"{i:064x}",
            name,
            decode.FileState(123_456, i, f"{i:064x}"),
            np.full(identity.feature_dim, i % 7, np.float32),
            f"{i:016x}",
        )
    for i in range(failures):
        records.failures[f"{count + i:064x}"] = journal.Failure(
            f"bad/{i}.jpg",
            10,
            1,
            "damaged image (UnidentifiedImageError: cannot identify)",
            "0" * 16,
        )
    journal.Journal(path, identity).append(records)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("rows", [10, 1000, 5000])
def test_merge_space_estimate_is_within_one_and_a_half_of_the_real_file(
    tmp_path, monkeypatch, rows, dtype
):
    identity = CacheIdentity(LITE0, "0" * 64, 1280, dtype, "keras", "test")
    path = tmp_path / identity.file_name()
    journal_rows(path, identity, rows, failures=3)
    estimates, real = [], []
    space = merge._space

    def measured(*args):
        estimates.append(space(*args)[0])
        return space(*args)

    real_write = store.write_main

    def write_main(temporary, *args):
        real_write(temporary, *args)
        status = os.stat(temporary)  # the temporary file the merge really writes
        real.append(max(status.st_size, status.st_blocks * 512))

    monkeypatch.setattr(merge, "_space", measured)
    monkeypatch.setattr(store, "write_main", write_main)
    assert merge.fold(path, identity) == merge.Folded(0, None)
    (estimate,), (size,) = estimates, real
    assert size <= estimate <= 1.5 * size + (64 << 10), (size, estimate)

    # Again with those rows in the main file and as many new ones.
    estimates.clear(), real.clear()
    journal_rows(path, identity, rows * 2)
    merge.fold(path, identity)
    (estimate,), (size,) = estimates, real
    assert size <= estimate <= 1.5 * size + (64 << 10), (size, estimate)


@pytest.fixture
def photo_dir(tmp_path):
    root = tmp_path / "photos"
    for i, pixels in enumerate(photos(20, seed=5)):
        write(pixels, root / ("cats" if i % 2 else "cups") / f"img{i:02d}.jpg")
    return root


def test_a_merge_that_cannot_fit_is_deferred_and_the_run_reads_the_journal(
    tmp_path, small_mount, photo_dir, backbone_builds, caplog
):
    found = images.discover(photo_dir)
    reference = BottleneckCache(tmp_path / "reference", LITE0)
    reference.update(found, batch_size=4, progress=False)
    expected = reference.read(found.entries)

    disk = small_mount("4m")
    cache = BottleneckCache(disk, LITE0)
    cache.update(
        dataclasses.replace(found, entries=found.entries[:8]), batch_size=4, progress=False
    )
    # Room for the journal of 12 more images, not for a second main file (~0.7 MB).
    filler = fill(disk, leave=300_000)
    with caplog.at_level(logging.WARNING):
        report = cache.update(found, batch_size=4, progress=False)
    assert (report.extracted, report.reused) == (12, 8)
    deferred = [r.getMessage() for r in caplog.records if "merge deferred" in r.getMessage()]
    assert len(deferred) == 1 and "MB free" in deferred[0], deferred
    assert "the journal keeps the new vectors" in deferred[0]
    assert list(cache.path.parent.glob("*.journal/*.npz"))

    assert np.array_equal(cache.read(found.entries), expected)
    streamed = np.zeros_like(expected)
    for positions, vectors in cache.stream(found.entries, block_rows=4, order_seed=1):
        streamed[positions] = vectors
    assert np.array_equal(streamed, expected)
    again = cache.update(found, batch_size=4, progress=False)  # still full: nothing redone
    assert (again.extracted, again.reused) == (0, 20)

    filler.unlink()
    caplog.clear()
    merged = cache.update(found, batch_size=4, progress=False)
    assert (merged.extracted, merged.reused) == (0, 20)
    assert not [r for r in caplog.records if "merge deferred" in r.getMessage()]
    assert not list(disk.glob("*.journal"))
    assert np.array_equal(cache.read(found.entries), expected)


def test_a_first_run_whose_merge_cannot_fit_reads_the_journal_alone(
    tmp_path, small_mount, photo_dir, backbone_builds, caplog
):
    found = images.discover(photo_dir)
    reference = BottleneckCache(tmp_path / "reference", LITE0)
    reference.update(found, batch_size=4, progress=False)
    disk = small_mount("1m")  # the journal (~60 kB) fits; one 655 kB chunk does not
    fill(disk, leave=400_000)
    cache = BottleneckCache(disk, LITE0)
    with caplog.at_level(logging.WARNING):
        assert cache.update(found, batch_size=4, progress=False).extracted == 20
    assert not cache.path.exists()
    assert any("merge deferred" in r.getMessage() for r in caplog.records)
    assert np.array_equal(cache.read(found.entries), reference.read(found.entries))


def test_a_run_on_a_full_cache_disk_trains_and_the_next_run_merges(
    tmp_path, small_mount, photo_dir, capsys, caplog
):
    disk = small_mount("1m")
    filler = fill(disk, leave=400_000)
    argv = [
        "--image_dir",
        str(photo_dir),
        "--bottleneck_dir",
        str(disk),
        "--output_dir",
        str(tmp_path / "out"),
        *FAST,
    ]
    with caplog.at_level(logging.WARNING):
        assert cli.main(argv) == 0
    assert "merge deferred: needs" in caplog.text and "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "out" / "labels.txt").read_text().split() == ["cats", "cups"]
    assert list(disk.glob("*.journal"))

    filler.unlink()
    caplog.clear()
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "merge deferred" not in caplog.text
    assert "0 extracted" in printed.out and "20 reused" in printed.out, printed.out
    assert not list(disk.glob("*.journal"))
