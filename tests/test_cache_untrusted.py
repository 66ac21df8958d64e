"""Cache files are data: planted HDF5, journal and shard files cannot make a run
read other files, exhaust memory, or write through a planted lock link.

Every hostile file here is built by the test: HDF5 caches whose vectors live
in another file (external storage, a virtual dataset, an external link),
soft links, wrong dtypes, absurd shapes, text records all pointing at one
large string, and a deflate-bomb ``.npz`` that declares 2 GiB in 2 MB.
"""

import logging
import os
import shutil
import time
import tracemalloc
import zipfile

import h5py
import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain.cache import BottleneckCache, hdf5_checks, journal, merge, shards, store
from retrain.cache.identity import CacheIdentity
from retrain.data import images
from retrain.errors import RetrainError

DIM = 8
IDENTITY = CacheIdentity("efficientnet_lite0", "f" * 64, DIM, "float16", "keras", "p1")
SECRET = b"TOPSECRET-" * 64  # 640 bytes: the other file's bytes that must never be copied


def records(start, count):
    """``count`` journal rows with keys ``start``..; bottleneck row i is all i."""
    rows = range(start, start + count)
    return journal.Records(
        key=[f"{i:064x}" for i in rows],
        relative_path=[f"c/{i}.jpg" for i in rows],
        size=[100 + i for i in rows],
        mtime_ns=[10**18 + i for i in rows],
        sha256=["a" * 64 for _ in rows],
        bottleneck=[np.full(DIM, i, np.float32) for i in rows],
    )


def good_cache(folder, count=4):
    """A real main cache file of ``count`` rows (keys 0..count-1), by a fold."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / IDENTITY.file_name()
    journal.Journal(path, IDENTITY).append(records(0, count))
    merge.fold(path, IDENTITY)
    return path


def secret_file(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secret.bin").write_bytes(SECRET)
    with h5py.File(folder / "secret.h5", "w") as other:  # a whole cache-shaped group
        with h5py.File(good_cache(folder / "real"), "r") as real:
            real.copy("images", other)
        del other["images/bottleneck"]
        other["images/bottleneck"] = np.frombuffer(SECRET[: 4 * DIM * 2], "f2").reshape(4, DIM)
    return folder


def external_storage(file, elsewhere):
    del file["images/bottleneck"]
    file["images"].create_dataset(
        "bottleneck", (4, DIM), "f2", external=[(str(elsewhere / "secret.bin"), 0, 4 * DIM * 2)]
    )


def external_storage_of_keys(file, elsewhere):
    del file["images/key"]
    file["images"].create_dataset(
        "key", (4,), "S64", external=[(str(elsewhere / "secret.bin"), 0, 4 * 64)]
    )


def virtual_dataset(file, elsewhere):
    layout = h5py.VirtualLayout((4, DIM), "f2")
    layout[:] = h5py.VirtualSource(str(elsewhere / "secret.h5"), "images/bottleneck", (4, DIM))
    del file["images/bottleneck"]
    file["images"].create_virtual_dataset("bottleneck", layout)


def external_link(file, elsewhere):
    del file["images"]
    file["images"] = h5py.ExternalLink(str(elsewhere / "secret.h5"), "/images")


def soft_link(file, elsewhere):
    file["hidden"] = np.frombuffer(SECRET[: 4 * DIM * 2], "f2").reshape(4, DIM)
    del file["images/bottleneck"]
    file["images/bottleneck"] = h5py.SoftLink("/hidden")


def size_as_text(file, elsewhere):
    del file["images/size"]
    file["images"].create_dataset("size", data=["1", "2", "3", "4"], dtype=h5py.string_dtype())


def bottleneck_as_float64(file, elsewhere):
    del file["images/bottleneck"]
    file["images/bottleneck"] = np.zeros((4, DIM))


def absurd_shape(file, elsewhere):
    # 640 GB declared, nothing stored: reading it would fill that much memory.
    del file["images/key"]
    file["images"].create_dataset("key", (10**10,), "S64", chunks=(1024,))


def text_records_all_pointing_at_one_large_string(file, elsewhere):
    """4,096 failure reasons whose raw records all point at one 1 MB string: 4 GB to read."""
    count = 4096
    del file["failed"]
    failed = file.create_group("failed")
    failed["key"] = np.array([f"{i:064x}".encode() for i in range(100, 100 + count)], "S64")
    failed.create_dataset("relative_path", data=["x.jpg"] * count, dtype=h5py.string_dtype())
    failed["size"] = np.zeros(count, np.int64)
    failed["mtime_ns"] = np.zeros(count, np.int64)
    reasons = failed.create_dataset(
        "reason", data=["r" * (1 << 20)] + ["r"] * (count - 1), dtype=h5py.string_dtype()
    )
    return reasons.id.get_offset(), count


PLANTS = [
    external_storage,
    external_storage_of_keys,
    virtual_dataset,
    external_link,
    soft_link,
    size_as_text,
    bottleneck_as_float64,
    absurd_shape,
    text_records_all_pointing_at_one_large_string,
]


def plant(path, how, elsewhere):
    with h5py.File(path, "a") as file:
        patch = how(file, elsewhere)
    if patch is not None:  # records patched on disk: every one like the first
        offset, count = patch
        raw = np.fromfile(path, hdf5_checks._VLEN_RECORD, count=count, offset=offset)
        raw[:] = raw[0]
        with open(path, "r+b") as file:
            file.seek(offset)
            file.write(raw.tobytes())


def files_holding(folder, needle):
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.parametrize("how", PLANTS, ids=lambda how: how.__name__)
def test_planted_cache_file_is_set_aside_before_any_data_is_read(
    tmp_path, how, caplog, monkeypatch
):
    elsewhere = secret_file(tmp_path / "elsewhere")
    cache = tmp_path / "cache"
    path = good_cache(cache)
    plant(path, how, elsewhere)
    journal.Journal(path, IDENTITY).append(records(50, 3))
    reads = []
    real_getitem = h5py.Dataset.__getitem__

    def spy(dataset, *args, **kwargs):
        reads.append(dataset.file.filename)
        return real_getitem(dataset, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        merge.fold(path, IDENTITY)
    assert time.monotonic() - started < 10
    monkeypatch.undo()
    assert not {str(path), str(elsewhere / "secret.h5")} & set(reads)
    aside = list(cache.glob(f"{path.name}.corrupt-*"))
    assert len(aside) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and str(aside[0]) in warnings[0]
    rebuilt = store.CacheFile(path, IDENTITY)
    try:
        assert sorted(rebuilt.rows) == [f"{i:064x}" for i in range(50, 53)]
        np.testing.assert_array_equal(rebuilt.bottlenecks([0, 1, 2])[:, 0], [50, 51, 52])
    finally:
        rebuilt.close()
    assert files_holding(cache, SECRET[:40]) == ([aside[0]] if how is soft_link else [])


def test_cache_file_that_is_a_fifo_or_a_symlink_is_set_aside_unopened(tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    other = good_cache(elsewhere)
    for kind in ("fifo", "symlink"):
        cache = tmp_path / kind
        cache.mkdir()
        path = cache / IDENTITY.file_name()
        os.mkfifo(path) if kind == "fifo" else path.symlink_to(other)
        with caplog.at_level(logging.WARNING):
            assert store.open_or_set_aside(path, IDENTITY) is None  # a FIFO would block here
        assert not path.exists() and not path.is_symlink()
        assert len(list(cache.glob(f"{path.name}.corrupt-*"))) == 1
    assert len(store.CacheFile(other, IDENTITY).rows) == 4  # the link's target is untouched


def test_plain_cache_written_by_retrain_passes_the_checks(tmp_path):
    path = good_cache(tmp_path, count=600)  # more rows than a bottleneck chunk
    cache = store.CacheFile(path, IDENTITY)
    try:
        assert len(cache.rows) == 600
        assert [b["relative_path"][0] for b in cache.blocks(np.ones(600, bool))] == [b"c/0.jpg"]
    finally:
        cache.close()


def test_run_over_a_planted_cache_never_copies_the_external_file(tmp_path, backbone_builds, caplog):
    """The issue's case: images/bottleneck kept in another file, then a normal update."""
    photos = tmp_path / "photos"
    for i, pixels in enumerate([data.chelsea(), data.coffee(), data.astronaut()]):
        (photos / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[:160, :200]).save(photos / "ab"[i % 2] / f"{i}.jpg")
    found = images.discover(photos)
    cache = BottleneckCache(tmp_path / "cache", "efficientnet_lite0")
    cache.update(found, progress=False)
    good = cache.read(found.entries)
    secret = tmp_path / "elsewhere" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(SECRET * 12)  # 7,680 bytes: three float16 vectors of 1,280
    with h5py.File(cache.path, "a") as file:
        del file["images/bottleneck"]
        file["images"].create_dataset(
            "bottleneck", (3, 1280), "f2", external=[(str(secret), 0, 3 * 1280 * 2)]
        )
    first = photos / found.entries[0].relative_path
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING):
        report = cache.update(found, progress=False)
    assert report.extracted == 3
    aside = list(cache.path.parent.glob(f"{cache.path.name}.corrupt-*"))
    assert len(aside) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "external files" in warnings[0] and str(aside[0]) in warnings[0]
    assert files_holding(cache.path.parent, SECRET[:40]) == []
    np.testing.assert_allclose(cache.read(found.entries), good, rtol=2e-3, atol=2e-3)


# --- journal and shard files -------------------------------------------------

BOMB_ROWS = (2 << 30) // (DIM * 2)  # float16 rows of DIM: 2 GiB


@pytest.fixture(scope="module")
def deflate_bomb(tmp_path_factory):
    """A journal-format .npz of 2 MB whose bottleneck member inflates to 2 GiB of zeros.

    Every other member is a real journal file's, so only sizes give it away.
    """
    folder = tmp_path_factory.mktemp("bomb")
    good = folder / "good.npz"
    np.savez(good, **journal.to_arrays(records(0, 2), IDENTITY))
    bomb = folder / "bomb.npz"
    zeros = bytes(1 << 24)
    with (
        zipfile.ZipFile(good) as source,
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out,
    ):
        for info in source.infolist():
            if info.filename != "bottleneck.npy":
                out.writestr(info.filename, source.read(info))
        with out.open("bottleneck.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "<f2", "fortran_order": False, "shape": (BOMB_ROWS, DIM)}
            )
            for _ in range(BOMB_ROWS * DIM * 2 // len(zeros)):
                member.write(zeros)
    assert bomb.stat().st_size < 4 << 20
    return bomb


def fold_measured(path):
    """merge.fold(path) -> (seconds, peak bytes Python and numpy allocated)."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        merge.fold(path, IDENTITY)
        return time.monotonic() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_rows(path, expected):
    cache = store.CacheFile(path, IDENTITY)
    try:
        assert sorted(cache.rows) == sorted(f"{i:064x}" for i in expected)
    finally:
        cache.close()


def test_deflate_bomb_in_the_journal_is_refused_from_its_headers(tmp_path, deflate_bomb, caplog):
    path = good_cache(tmp_path)
    pending = journal.Journal(path, IDENTITY)
    pending.append(records(10, 2))
    shutil.copy(deflate_bomb, pending.folder / "00000009.npz")
    with caplog.at_level(logging.WARNING):
        seconds, peak = fold_measured(path)
    assert seconds < 5 and peak < 100 << 20, (seconds, peak)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "00000009.npz" in warnings[0] and "declare" in warnings[0]
    assert_rows(path, [0, 1, 2, 3, 10, 11])  # the cached rows and the good batch kept


def test_deflate_bomb_shard_is_set_aside_from_its_headers(tmp_path, deflate_bomb, caplog):
    path = good_cache(tmp_path)
    shard = tmp_path / f"{path.name}.shard-0of1-{'0' * 16}-000001.npz"
    shutil.copy(deflate_bomb, shard)
    tracemalloc.start()
    try:
        with pytest.raises(journal.UnreadableCache, match="declare"):  # as the plan reads it
            shards.load(shard, IDENTITY, ("key", "size", "mtime_ns"))
        assert tracemalloc.get_traced_memory()[1] < 100 << 20
    finally:
        tracemalloc.stop()
    with caplog.at_level(logging.WARNING):
        seconds, peak = fold_measured(path)
    assert seconds < 5 and peak < 100 << 20, (seconds, peak)
    assert not shard.exists() and shard.with_name(shard.name + ".unused").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(shard) in warnings[0]
    assert_rows(path, [0, 1, 2, 3])


def rewritten(source, target, member, array=None, header=None):
    """A copy of the .npz ``source`` with ``member`` replaced by ``array`` (saved
    with pickling allowed) or by a bare ``header`` dict and no data."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            if info.filename != member:
                new.writestr(info.filename, old.read(info))
        with new.open(member, "w") as stream:
            if header is None:
                np.lib.format.write_array(stream, array, allow_pickle=True)
            else:
                np.lib.format.write_array_header_1_0(stream, header)
    return target


@pytest.mark.parametrize(
    "member, array, header, message",
    [
        ("relative_path.npy", np.array([b"a", 1], dtype=object), None, "Python objects"),
        ("size.npy", np.zeros(2, np.float64), None, "holds float64"),
        ("bottleneck.npy", np.zeros((2, DIM + 1), np.float16), None, "shape"),
        ("key.npy", np.zeros(3, "S64"), None, "shape"),
        (
            "bottleneck.npy",
            None,
            {"descr": "<f2", "fortran_order": False, "shape": (10**9, DIM)},
            "declares",
        ),
    ],
)
def test_journal_member_of_wrong_dtype_shape_or_size_is_refused(
    tmp_path, member, array, header, message
):
    good = tmp_path / "good.npz"
    np.savez(good, **journal.to_arrays(records(0, 2), IDENTITY))
    assert len(shards.load(good, IDENTITY)["key"]) == 2
    bad = rewritten(good, tmp_path / "bad.npz", member, array, header)
    with pytest.raises(journal.UnreadableCache, match=message):
        shards.load(bad, IDENTITY)


# --- the lock file -------------------------------------------------------------


def test_lock_path_planted_as_a_symlink_is_not_followed(tmp_path):
    photos = tmp_path / "photos" / "cats"
    photos.mkdir(parents=True)
    Image.fromarray(data.chelsea()[:64, :64]).save(photos / "a.jpg")
    found = images.discover(tmp_path / "photos")
    cache = BottleneckCache(tmp_path / "cache", "efficientnet_lite0")
    cache.path.parent.mkdir()
    lock = cache.path.with_name(cache.path.name + ".lock")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for target in (victim, tmp_path / "absent.txt"):
        lock.unlink(missing_ok=True)
        lock.symlink_to(target)
        with pytest.raises(RetrainError, match=f"lock file {lock} is a symbolic link.*Remove"):
            cache.update(found, progress=False)
    assert victim.read_text() == "precious"  # not truncated through the link
    assert not (tmp_path / "absent.txt").exists()  # not created through the link
    assert not cache.path.exists()
