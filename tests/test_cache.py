"""The bottleneck cache with the real EfficientNet-Lite0 (retrain/cache/)."""

import io
import logging
import os
import shutil

import filelock
import h5py
import numpy as np
import pytest
from PIL import Image
from skimage import data
from sklearn.datasets import load_digits

from retrain import backbones
from retrain.cache import BottleneckCache, journal, merge
from retrain.cache.identity import CacheIdentity
from retrain.data import decode, images, resizing
from retrain.errors import RetrainError


def photos(count, seed=0):
    """Distinct real photo crops, uint8 [h, w, 3]."""
    sources = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        source = sources[i % len(sources)]
        top, left = rng.integers(0, 60, size=2)
        crops.append(source[top : top + 180 + 7 * i, left : left + 200])
    return crops


def write(array, path, format=None, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=format, **options)
    return path


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "photos"
    formats = ["jpg", "png", "webp", "bmp", "gif"]
    for i, pixels in enumerate(photos(10)):
        write(pixels, root / ("cats" if i % 2 else "cups") / f"img{i}.{formats[i % 5]}")
    return root


def expected_bottlenecks(image_list):
    """What the cache must hold: decode, resize and the backbone, one image at a time."""
    model = backbones.load("efficientnet_lite0")
    pixels = [
        resizing.resize_to_input(
            decode.decode_rgb(image_list.image_dir / e.relative_path, 224), 224
        )
        for e in image_list.entries
    ]
    return np.concatenate([model(p[None], training=False).numpy() for p in pixels])


def test_build_reuse_and_read(tmp_path, image_dir, backbone_builds):
    found = images.discover(image_dir)
    cache = BottleneckCache(tmp_path / "cache", "efficientnet_lite0")
    assert cache.path.parent == tmp_path / "cache"
    requests = backbone_builds["efficientnet_lite0"]
    first = cache.update(found, batch_size=4, progress=False)
    assert (first.extracted, first.reused, first.failed) == (10, 0, [])
    assert first.path == cache.path and cache.path.is_file()
    assert backbone_builds["efficientnet_lite0"] == requests + 1
    second = cache.update(found, batch_size=4, progress=False)
    assert (second.extracted, second.reused, second.failed) == (0, 10, [])
    assert backbone_builds["efficientnet_lite0"] == requests + 1, "built with nothing to do"

    vectors = cache.read(found.entries)
    assert vectors.dtype == np.float32 and vectors.shape == (10, 1280)
    np.testing.assert_allclose(vectors, expected_bottlenecks(found), rtol=2e-3, atol=2e-3)
    assert np.array_equal(cache.read(found.entries[::-1]), vectors[::-1])
    assert np.array_equal(cache.read(found.entries[3:4]), vectors[3:4])
    assert not list(cache.path.parent.glob("*.journal")), "journal left after update"


def test_float32_storage_keeps_full_precision(tmp_path, image_dir, backbone_builds):
    found = images.discover(image_dir)
    cache = BottleneckCache(tmp_path, "efficientnet_lite0", dtype="float32")
    assert cache.path.name.endswith("-float32.h5")
    cache.update(found, progress=False)
    with h5py.File(cache.path) as file:
        assert file["images/bottleneck"].dtype == np.float32
    np.testing.assert_allclose(
        cache.read(found.entries), expected_bottlenecks(found), rtol=1e-4, atol=1e-4
    )
    half = BottleneckCache(tmp_path, "efficientnet_lite0", dtype="float16")
    assert half.path != cache.path
    with pytest.raises(RetrainError, match="no bottleneck cache .*-float16.h5 yet"):
        half.read(found.entries)


def test_changed_image_is_extracted_again_and_unchanged_is_not(
    tmp_path, image_dir, backbone_builds, monkeypatch
):
    cache = BottleneckCache(tmp_path / "cache", "efficientnet_lite0")
    found = images.discover(image_dir)
    cache.update(found, progress=False)
    before = dict(zip((e.relative_path for e in found.entries), cache.read(found.entries)))

    replaced = image_dir / "cats" / "img1.png"
    write(photos(12)[11], replaced)
    same_size = image_dir / "cups" / "img8.bmp"  # BMP: new pixels, same byte count
    old_size = same_size.stat().st_size
    write(np.ascontiguousarray(np.asarray(Image.open(same_size))[::-1]), same_size)
    assert same_size.stat().st_size == old_size
    touched = image_dir / "cups" / "img0.jpg"  # same bytes, new mtime (a copy)
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))

    report = cache.update(found, progress=False)
    assert (report.extracted, report.reused) == (2, 8)
    after = dict(zip((e.relative_path for e in found.entries), cache.read(found.entries)))
    for path in before:
        changed = path in ("cats/img1.png", "cups/img8.bmp")
        assert np.array_equal(before[path], after[path]) != changed, path

    digests = []
    monkeypatch.setattr("retrain.data.decode.file_state", digests.append)
    third = cache.update(found, progress=False)
    assert (third.extracted, third.reused, digests) == (0, 10, []), "touched mtime not stored"
    with h5py.File(cache.path) as file:
        keys = file["images/key"][()]
    assert len(keys) == len(set(keys.tolist())) == 10

    # The rule the README states: size and modification time both unchanged
    # are trusted without reading the file, so a same-size rewrite that keeps
    # the mtime (cp -p, rsync -t) keeps its vector until the mtime changes.
    status = same_size.stat()
    write(np.ascontiguousarray(np.asarray(Image.open(same_size))[:, ::-1]), same_size)
    os.utime(same_size, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert same_size.stat().st_size == status.st_size
    assert cache.update(found, progress=False).extracted == 0
    os.utime(same_size, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    assert cache.update(found, progress=False).extracted == 1


def test_switching_backbone_uses_a_separate_cache(tmp_path, image_dir, backbone_builds):
    found = images.discover(image_dir)
    lite0 = BottleneckCache(tmp_path, "efficientnet_lite0")
    lite1 = BottleneckCache(tmp_path, "efficientnet_lite1")
    assert lite0.path != lite1.path
    assert lite0.update(found, progress=False).extracted == 10
    assert lite1.update(found, progress=False).extracted == 10
    assert lite0.update(found, progress=False).extracted == 0
    assert not np.allclose(lite0.read(found.entries), lite1.read(found.entries), atol=0.05)
    with h5py.File(lite1.path) as file:
        assert file.attrs["backbone"] == "efficientnet_lite1"
        assert file.attrs["fingerprint"] == backbones.fingerprint("efficientnet_lite1")


def test_cache_of_another_backbone_under_this_name_is_set_aside(
    tmp_path, image_dir, backbone_builds, caplog
):
    found = images.discover(image_dir)
    lite1 = BottleneckCache(tmp_path, "efficientnet_lite1")
    lite1.update(found, progress=False)
    lite0 = BottleneckCache(tmp_path, "efficientnet_lite0")
    shutil.copy(lite1.path, lite0.path)
    with caplog.at_level(logging.WARNING):
        assert lite0.update(found, progress=False).extracted == 10
    aside = list(tmp_path.glob(f"{lite0.path.name}.corrupt-*"))
    assert len(aside) == 1
    assert any(
        str(lite0.path) in r.getMessage() and str(aside[0]) in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unreadable_cache_file_is_moved_aside_and_rebuilt(
    tmp_path, image_dir, damage, backbone_builds, caplog
):
    found = images.discover(image_dir)
    cache = BottleneckCache(tmp_path, "efficientnet_lite0")
    cache.update(found, progress=False)
    good = cache.read(found.entries)
    content = cache.path.read_bytes()
    damaged = {
        "truncate": content[: len(content) // 2],
        "garbage": bytes(len(content)) + b"x",
        "empty": b"",
    }[damage]
    cache.path.write_bytes(damaged)
    with pytest.raises(RetrainError, match="cannot be read.*update"):
        cache.read(found.entries)
    with caplog.at_level(logging.WARNING):
        report = cache.update(found, progress=False)
    assert report.extracted == 10
    np.testing.assert_allclose(cache.read(found.entries), good, rtol=2e-3, atol=2e-3)
    aside = list(tmp_path.glob(f"{cache.path.name}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    warnings = [r.getMessage() for r in caplog.records if "moved it to" in r.getMessage()]
    assert len(warnings) == 1 and str(cache.path) in warnings[0] and str(aside[0]) in warnings[0]


def test_damaged_journal_file_is_discarded_and_its_images_extracted(
    tmp_path, image_dir, backbone_builds, caplog
):
    found = images.discover(image_dir)
    cache = BottleneckCache(tmp_path, "efficientnet_lite0")
    pending = journal.Journal(cache.path, cache.identity)
    pending.folder.mkdir()
    (pending.folder / "00000001.npz").write_bytes(b"PK\x03\x04 not a zip")
    with caplog.at_level(logging.WARNING):
        report = cache.update(found, progress=False)
    assert report.extracted == 10
    assert any("discarding damaged journal file" in r.getMessage() for r in caplog.records)
    assert not pending.folder.exists()


BAD_FILES = {
    "zero.jpg": ("discovery", "empty file"),
    "text.jpg": ("discovery", "unsupported format"),
    "scan.jpg": ("discovery", "unsupported format (TIFF)"),
    "cut.jpg": ("extraction", "image file is truncated"),
    "garbled.png": ("extraction", "damaged PNG file"),
}


def write_bad_and_odd_files(folder):
    pixels = data.chelsea()[:120, :160]
    whole = io.BytesIO()
    Image.fromarray(pixels).save(whole, "JPEG")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("these are not pixels\n")
    write(pixels, folder / "scan.jpg", format="TIFF")
    (folder / "cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (folder / "garbled.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    write(np.array([[[200, 30, 40]]], np.uint8), folder / "dot.png")
    sixteen = Image.fromarray(np.linspace(0, 65535, 120 * 160).reshape(120, 160).astype(np.uint16))
    sixteen.save(folder / "gray16.png")
    assert Image.open(folder / "gray16.png").mode == "I;16"
    write(np.dstack([pixels, np.full(pixels.shape[:2], 128, np.uint8)]), folder / "alpha.png")
    Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")


def test_bad_files_are_skipped_with_one_warning_each(tmp_path, image_dir, backbone_builds, caplog):
    write_bad_and_odd_files(image_dir / "cats")
    with caplog.at_level(logging.WARNING):
        found = images.discover(image_dir)
        cache = BottleneckCache(tmp_path, "efficientnet_lite0")
        report = cache.update(found, batch_size=4, progress=False)
    skipped = dict(found.skipped) | dict(report.failed)
    for name, (stage, reason) in BAD_FILES.items():
        assert reason in skipped[f"cats/{name}"], name
        in_stage = dict(found.skipped if stage == "discovery" else report.failed)
        assert f"cats/{name}" in in_stage, name
        lines = [r for r in caplog.records if r.getMessage().startswith(f"skipped cats/{name}: ")]
        assert len(lines) == 1, name
    assert len(skipped) == len(BAD_FILES)
    assert any(r.getMessage().startswith("2 image(s) could not") for r in caplog.records)

    good = [e for e in found.entries if e.relative_path not in dict(report.failed)]
    assert len(good) == 10 + 4 and report.extracted == 14
    odd = {e.relative_path: i for i, e in enumerate(good)}
    vectors = cache.read(good)
    assert np.isfinite(vectors).all()
    assert not np.allclose(vectors[odd["cats/dot.png"]], vectors[odd["cats/gray16.png"]])

    # Failures are remembered: no decode, no backbone, still reported.
    requests = backbone_builds["efficientnet_lite0"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = cache.update(found, progress=False)
    assert (again.extracted, again.reused, again.failed) == (0, 14, report.failed)
    assert backbone_builds["efficientnet_lite0"] == requests
    assert len([r for r in caplog.records if r.getMessage().startswith("skipped ")]) == 2

    write(data.coffee()[:100, :100], image_dir / "cats" / "cut.jpg")
    fixed = cache.update(found, progress=False)
    assert (fixed.extracted, fixed.reused) == (1, 14)
    assert [path for path, _ in fixed.failed] == ["cats/garbled.png"]


def test_vanished_file_is_reported_not_fatal(tmp_path, image_dir, backbone_builds):
    found = images.discover(image_dir)
    (image_dir / "cats" / "img3.bmp").unlink()
    report = BottleneckCache(tmp_path, "efficientnet_lite0").update(found, progress=False)
    assert report.extracted == 9
    assert report.failed == [("cats/img3.bmp", "cannot read: No such file or directory")]


def test_read_names_what_is_missing(tmp_path, image_dir, backbone_builds):
    found = images.discover(image_dir)
    cache = BottleneckCache(tmp_path, "efficientnet_lite0")
    with pytest.raises(RetrainError, match="no bottleneck cache"):
        cache.read(found.entries)
    cache.update(images.ImageList(image_dir, found.class_names, found.entries[:4]), progress=False)
    with pytest.raises(RetrainError, match=r"6 of 10 images .* e\.g\. cats/img9\.gif"):
        cache.read(found.entries)


def test_bad_arguments_are_refused(tmp_path, image_dir):
    with pytest.raises(RetrainError, match="Received: dtype='float64'"):
        BottleneckCache(tmp_path, "efficientnet_lite0", dtype="float64")
    with pytest.raises(RetrainError, match="Received: backbone='lite9'"):
        BottleneckCache(tmp_path, "lite9")
    cache = BottleneckCache(tmp_path, "efficientnet_lite0")
    with pytest.raises(RetrainError, match="Received: batch_size=0"):
        cache.update(images.discover(image_dir), batch_size=0)
    (tmp_path / "taken").write_text("a file where the cache folder should be")
    cache = BottleneckCache(tmp_path / "taken", "efficientnet_lite0")
    with pytest.raises(RetrainError, match="Cannot write the bottleneck cache .*taken"):
        cache.update(images.discover(image_dir))


def test_held_lock_makes_update_wait_then_give_up(tmp_path, image_dir, capsys):
    cache = BottleneckCache(tmp_path, "efficientnet_lite0", lock_timeout=0.5)
    holder = filelock.FileLock(f"{cache.path}.lock")
    with holder:
        with pytest.raises(RetrainError, match="Gave up after 0 s .*lock_timeout=0.5"):
            cache.update(images.discover(image_dir), progress=False)
    assert "Another process is updating the bottleneck cache" in capsys.readouterr().err
    assert not cache.path.exists()


def test_progress_bar_shows_rate_on_stderr(tmp_path, image_dir, backbone_builds, capsys):
    BottleneckCache(tmp_path, "efficientnet_lite0").update(images.discover(image_dir))
    captured = capsys.readouterr()
    assert "bottlenecks" in captured.err and "img/s" in captured.err
    assert captured.out == ""


def test_a_fold_of_many_journal_files_keeps_the_newest_record_of_each_key(tmp_path):
    """Winners read file by file and written in blocks: every key once, its newest vector."""
    digits = load_digits().data.astype(np.float32)  # [1797, 64], values 0..16
    identity = CacheIdentity("efficientnet_lite0", "0" * 64, 64, "float16", "litert", "test")
    path = tmp_path / "cache.h5"
    pending = journal.Journal(path, identity)
    newest, row = {}, 0
    for number in range(45):  # 45 files of 7 rows: blocks cross CHUNK_ROWS (256)
        records = journal.Records()
        for i in range(7):
            # Every third row of a later file rewrites a key of the file before.
            key = f"{(number * 7 + i - 7 * (i % 3 == 0 and number > 0)):064x}"
            state = decode.FileState(size=row, mtime_ns=row, sha256=f"{row:064x}")
            records.add_row(key, f"class/é{row}.jpg", state, digits[row], "f" * 16)
            newest[key] = (row, f"class/é{row}.jpg")
            row += 1
        pending.append(records)
    assert merge.fold(path, identity).deferred is None
    assert not pending.folder.exists()
    with h5py.File(path, "r") as file:
        keys = [k.decode() for k in file["images/key"][()]]
        vectors = file["images/bottleneck"][()]
        sizes = file["images/size"][()]
        names = [n.decode() if isinstance(n, bytes) else n for n in file["images/relative_path"]]
    assert sorted(keys) == sorted(newest)
    for key, vector, size, name in zip(keys, vectors, sizes, names):
        assert (size, name) == newest[key]
        np.testing.assert_array_equal(vector, digits[size].astype(np.float16))
