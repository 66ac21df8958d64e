"""Discovery and the hash split (retrain/data/images.py)."""

import logging
import os
import shutil
import unicodedata

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain.data import images
from retrain.errors import RetrainError


def save(array, path, format=None, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=format, **options)
    return path


@pytest.fixture(scope="module")
def photo():
    return data.chelsea()[:96, :128]


@pytest.fixture
def tree(tmp_path, photo):
    """image_dir with two classes, nested folders, odd files and hidden ones."""
    root = tmp_path / "photos"
    save(photo, root / "cats" / "a.jpg")
    save(photo[::-1], root / "cats" / "b.png")
    save(photo[:, ::-1], root / "cats" / "deep" / "er" / "c.webp")
    save(photo, root / "cats" / "named_wrongly.jpg", format="PNG")
    save(photo, root / "cats" / "no_extension", format="BMP")
    save(data.coffee()[:64, :64], root / "cups" / "d.gif")
    save(photo, root / "cups" / ".hidden.jpg")
    save(photo, root / "cups" / ".ipynb_checkpoints" / "e.jpg")
    save(photo, root / ".secret" / "f.jpg")
    (root / "cups" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cups" / "notes.txt").write_text("not an image")
    (root / "cups" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    save(photo, root / "loose.jpg")
    return root


def test_discover_lists_classes_and_images_by_content(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="retrain.data.images"):
        found = images.discover(tree)
    assert found.image_dir == tree
    assert found.class_names == ["cats", "cups"]
    assert [(e.relative_path, e.label, e.label_index) for e in found.entries] == [
        ("cats/a.jpg", "cats", 0),
        ("cats/b.png", "cats", 0),
        ("cats/deep/er/c.webp", "cats", 0),
        ("cats/named_wrongly.jpg", "cats", 0),
        ("cats/no_extension", "cats", 0),
        ("cups/d.gif", "cups", 1),
    ]
    assert [path for path, _ in found.skipped] == ["cups/notes.txt"]
    assert found.skipped[0][1].startswith("unsupported format")
    assert [r.getMessage() for r in caplog.records if "loose.jpg" in r.getMessage()]
    for entry in found.entries:
        assert entry.key == images.cache_key(entry.relative_path)
        assert len(entry.key) == 64


def test_unsupported_formats_are_named(tmp_path, photo):
    save(photo, tmp_path / "c" / "scan.jpg", format="TIFF")
    (tmp_path / "c" / "phone.jpg").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))
    (tmp_path / "c" / "empty.jpg").write_bytes(b"")
    save(photo, tmp_path / "c" / "ok.jpg")
    found = images.discover(tmp_path)
    assert dict(found.skipped) == {
        "c/empty.jpg": "empty file",
        "c/phone.jpg": "unsupported format (HEIC); convert it to JPEG or PNG",
        "c/scan.jpg": "unsupported format (TIFF); convert it to JPEG or PNG",
    }
    assert [e.relative_path for e in found.entries] == ["c/ok.jpg"]


@pytest.mark.parametrize(
    "bad",
    [
        {"testing_percentage": -1},
        {"testing_percentage": 100},
        {"validation_percentage": float("nan")},
        {"validation_percentage": "10"},
        {"testing_percentage": 60, "validation_percentage": 40},
        {"testing_percentage": True},
    ],
)
def test_bad_percentages_are_refused_with_their_values(tree, bad):
    with pytest.raises(RetrainError, match="Received: .*percentage="):
        images.discover(tree, **bad)


def test_missing_or_classless_image_dir(tmp_path):
    with pytest.raises(RetrainError, match="Received: image_dir=.*nowhere"):
        images.discover(tmp_path / "nowhere")
    save(np.zeros((8, 8, 3), np.uint8), tmp_path / "flat" / "a.png")
    (tmp_path / "flat" / ".hidden").mkdir()
    with pytest.raises(RetrainError, match="no class folders"):
        images.discover(tmp_path / "flat")


def test_symlinks_are_followed_once_without_looping_nor_blocking(tmp_path, photo):
    outside = tmp_path / "outside"
    save(photo, outside / "x.jpg")
    root = tmp_path / "photos"
    save(photo, root / "cats" / "a.jpg")
    os.symlink(outside, root / "cats" / "linked")
    os.symlink(root / "cats", root / "cats" / "loop")
    os.symlink(tmp_path / "missing.jpg", root / "cats" / "broken.jpg")
    os.mkfifo(root / "cats" / "pipe.jpg")
    found = images.discover(root)
    assert [e.relative_path for e in found.entries] == ["cats/a.jpg", "cats/linked/x.jpg"]
    assert found.skipped == [
        ("cats/broken.jpg", "cannot read: broken symbolic link"),
        ("cats/pipe.jpg", "not a regular file (FIFO)"),
    ]


def test_split_does_not_move_when_folder_moves_or_grows(tree, tmp_path, photo):
    for i in range(20):
        save(photo[i:], tree / "cups" / f"old{i}.jpg")
    before = images.discover(tree, 30, 30)
    # With every bucket populated, a split hashing the full path would move some.
    assert {e.split_bucket for e in before.entries} == set(images.BUCKETS)
    moved = shutil.move(str(tree), str(tmp_path / "elsewhere" / "renamed"))
    for i in range(20):
        save(photo[i:], tmp_path / "elsewhere" / "renamed" / "cats" / f"new{i}.jpg")
    after = images.discover(moved, 30, 30)
    assert len(after.entries) == len(before.entries) + 20
    by_path = {e.relative_path: e for e in after.entries}
    for entry in before.entries:
        assert by_path[entry.relative_path] == entry


def test_split_is_pinned_and_matches_percentages():
    # Pinned values: the same file must get the same bucket on every machine
    # and every version; a change of hash or formula fails here.
    assert images.split_percentage("daisy/a.jpg") == pytest.approx(21.1602002382)
    assert images.cache_key("daisy/a.jpg") == (
        "4f4645e6dda1d3f641b86058208bbb088c08d35466241ee34cd8cf99d1b15c64"
    )
    paths = [f"class{i % 7}/img{i}.jpg" for i in range(20000)]
    buckets = [images.split_bucket(p, 15, 5) for p in paths]
    assert buckets.count("testing") / len(paths) == pytest.approx(0.15, abs=0.01)
    assert buckets.count("validation") / len(paths) == pytest.approx(0.05, abs=0.01)
    assert {images.split_bucket(p, 0, 0) for p in paths} == {"training"}


def test_nohash_variants_share_a_bucket_but_not_a_key():
    for stem in range(200):
        variants = [f"roses/photo{stem}_nohash_{i}.jpg" for i in range(5)]
        assert len({images.split_percentage(v) for v in variants}) == 1
        assert len({images.cache_key(v) for v in variants}) == 5
    spread = {images.split_bucket(f"roses/photo{s}_nohash_0.jpg") for s in range(200)}
    assert spread == {"training", "validation", "testing"}
    # Only the file name is grouped: the same stem in another class is separate.
    assert images.split_percentage("a/x_nohash_1.jpg") != images.split_percentage(
        "b/x_nohash_1.jpg"
    )


def test_unicode_normalisation_does_not_change_split_or_key():
    composed = unicodedata.normalize("NFC", "caf\u00e9/cr\u00e8me.jpg")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert images.cache_key(composed) == images.cache_key(decomposed)
    assert images.split_percentage(composed) == images.split_percentage(decomposed)


def test_bucket_lists_entries_and_refuses_unknown_names(tree):
    found = images.discover(tree, 30, 30)
    together = sum((found.bucket(b) for b in images.BUCKETS), [])
    assert sorted(together, key=lambda e: e.relative_path) == found.entries
    with pytest.raises(RetrainError, match="Received: name='train'"):
        found.bucket("train")


# --- decode_rgb ---------------------------------------------------------------


def test_names_equal_after_unicode_normalisation_keep_one_key_each(tmp_path):
    # Linux keeps both spellings as two files; they share a cache key, so
    # keeping both would give one image the other's cached vector.
    composed = unicodedata.normalize("NFC", "caf\u00e9.png")
    decomposed = unicodedata.normalize("NFD", composed)
    save(np.zeros((8, 8, 3), np.uint8), tmp_path / "c" / composed)
    save(np.full((8, 8, 3), 255, np.uint8), tmp_path / "c" / decomposed)
    found = images.discover(tmp_path)
    assert len(found.entries) == 1
    assert len({e.key for e in found.entries}) == len(found.entries)
    ((skipped, reason),) = found.skipped
    assert skipped != found.entries[0].relative_path
    assert found.entries[0].relative_path in reason and "rename" in reason


def test_unreadable_image_dir_is_a_retrain_error(tmp_path, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images.os, "listdir", refuse)
    with pytest.raises(RetrainError, match="Permission denied.*Received: image_dir="):
        images.discover(tmp_path)
