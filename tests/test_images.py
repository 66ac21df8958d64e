"""Discovery, the hash split, decoding and resizing (retrain/images.py)."""

import io
import logging
import os
import shutil
import struct
import unicodedata
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain import images
from retrain.errors import RetrainError


def save(array, path, format=None, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=format, **options)
    return path


def png16(array, path):
    """Writes a 16-bit PNG (gray [h, w] or RGB [h, w, 3]); Pillow cannot write 16-bit RGB."""
    height, width = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    rows = array.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
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
    with caplog.at_level(logging.WARNING, logger="retrain.images"):
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


@pytest.mark.parametrize("bad", [
    {"testing_percentage": -1}, {"testing_percentage": 100},
    {"validation_percentage": float("nan")}, {"validation_percentage": "10"},
    {"testing_percentage": 60, "validation_percentage": 40},
    {"testing_percentage": True},
])
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
    assert found.skipped == [("cats/broken.jpg", "cannot read: broken symbolic link"),
                             ("cats/pipe.jpg", "not a regular file")]


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
        "4f4645e6dda1d3f641b86058208bbb088c08d35466241ee34cd8cf99d1b15c64")
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
        "b/x_nohash_1.jpg")


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

def test_decodes_each_format_to_rgb(tmp_path, photo):
    for format in ("JPEG", "PNG", "BMP", "WEBP", "GIF"):
        path = save(photo, tmp_path / f"x.{format.lower()}", format=format)
        pixels = images.decode_rgb(path)
        assert pixels.dtype == np.uint8 and pixels.shape == photo.shape, format
        tolerance = {"JPEG": 12, "WEBP": 12, "GIF": 40}.get(format, 0)
        assert np.abs(pixels.astype(int) - photo).mean() <= tolerance, format


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert images.decode_rgb(path)[0, 0].tolist() == [255, 0, 0]


def test_grayscale_palette_and_cmyk_become_rgb(tmp_path, photo):
    gray = save(photo[..., 1], tmp_path / "gray.png")
    assert (images.decode_rgb(gray) == photo[..., 1:2]).all()
    palette = tmp_path / "palette.png"
    Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    assert np.abs(images.decode_rgb(palette).astype(int) - photo).mean() < 8
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(photo).convert("CMYK").save(cmyk, quality=95)
    assert Image.open(cmyk).mode == "CMYK"
    assert np.abs(images.decode_rgb(cmyk).astype(int) - photo).mean() < 8


def test_alpha_is_composited_on_white(tmp_path, photo):
    rgba = np.dstack([photo, np.zeros(photo.shape[:2], np.uint8)])
    rgba[:, : photo.shape[1] // 2, 3] = 255
    decoded = images.decode_rgb(save(rgba, tmp_path / "alpha.png"))
    half = photo.shape[1] // 2
    assert (decoded[:, :half] == photo[:, :half]).all()
    assert (decoded[:, half:] == 255).all()
    gray_alpha = Image.fromarray(photo[..., 0]).convert("LA")
    gray_alpha.putalpha(0)
    gray_alpha.save(tmp_path / "la.png")
    assert (images.decode_rgb(tmp_path / "la.png") == 255).all()
    transparent_gif = Image.new("P", (8, 8), 0)
    transparent_gif.putpalette([0, 0, 0] * 256)
    transparent_gif.save(tmp_path / "t.gif", transparency=0)
    assert (images.decode_rgb(tmp_path / "t.gif") == 255).all()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 4).astype(np.uint16).reshape(4, 64)
    decoded = images.decode_rgb(png16(ramp, tmp_path / "gray16.png"))
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert (decoded == expected[..., None]).all()
    assert decoded.max() == 255 and len(np.unique(decoded)) > 200
    colour = np.stack([ramp, ramp[::-1], np.full_like(ramp, 32896)], axis=-1)
    decoded = images.decode_rgb(png16(colour, tmp_path / "rgb16.png"))
    assert np.abs(decoded.astype(int) - np.round(colour / 257.0)).max() <= 1


def test_exif_orientation_is_applied(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(photo).save(path, exif=exif, quality=95)
    decoded = images.decode_rgb(path)
    assert decoded.shape == (photo.shape[1], photo.shape[0], 3)
    assert np.abs(decoded.astype(int) - np.rot90(photo, -1)).mean() < 8


def test_one_pixel_image_is_accepted(tmp_path):
    path = save(np.array([[[10, 200, 30]]], np.uint8), tmp_path / "dot.png")
    assert images.decode_rgb(path).tolist() == [[[10, 200, 30]]]
    resized = images.resize_to_input(images.decode_rgb(path), 224)
    assert resized.shape == (224, 224, 3)
    assert np.allclose(resized, [10, 200, 30])


def test_draft_decoding_keeps_jpeg_sides_at_least_twice_the_target(tmp_path, photo):
    big = np.asarray(Image.fromarray(photo).resize((2000, 1500)))
    path = save(big, tmp_path / "big.jpg", quality=95)
    full = images.decode_rgb(path)
    small = images.decode_rgb(path, target_size=224)
    assert full.shape == (1500, 2000, 3)
    assert small.shape == (750, 1000, 3)
    assert images.decode_rgb(path, target_size=400).shape == (1500, 2000, 3)
    at_input = [images.resize_to_input(x, 224) for x in (full, small)]
    assert np.abs(at_input[0] - at_input[1]).mean() < 1.0
    png = save(big, tmp_path / "big.png")
    assert images.decode_rgb(png, target_size=224).shape == (1500, 2000, 3)


@pytest.mark.parametrize("name, content, reason", [
    ("zero.jpg", b"", "empty file"),
    ("text.jpg", b"hello, I am text\n" * 10, "not a JPEG, PNG, GIF, BMP or WebP image"),
    ("fake.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "damaged PNG file"),
])
def test_bad_bytes_raise_decode_errors_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(images.ImageDecodeError, match=reason) as raised:
        images.decode_rgb(path)
    assert str(path) in str(raised.value)
    assert raised.value.path == str(path)
    assert isinstance(raised.value, RetrainError)


def test_truncated_jpeg_and_unsupported_format_raise(tmp_path, photo):
    whole = io.BytesIO()
    Image.fromarray(photo).save(whole, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(images.ImageDecodeError, match="image file is truncated"):
        images.decode_rgb(cut)
    tiff = save(photo, tmp_path / "scan.tif")
    with pytest.raises(images.ImageDecodeError, match="not a JPEG"):
        images.decode_rgb(tiff)
    with pytest.raises(images.ImageDecodeError, match="No such file"):
        images.decode_rgb(tmp_path / "missing.jpg")


def test_decode_from_content_reads_no_file(tmp_path, photo):
    path = save(photo, tmp_path / "x.png")
    content = path.read_bytes()
    path.unlink()
    assert (images.decode_rgb(path, content=content) == photo).all()


# --- resize_to_input -------------------------------------------------------------

def test_resize_is_the_exported_models_resizing_layer(photo):
    import keras

    layer = keras.layers.Resizing(224, 224, interpolation="bilinear", antialias=True)
    ours = images.resize_to_input(photo, 224)
    theirs = keras.ops.convert_to_numpy(layer(photo[None].astype("float32")))[0]
    assert ours.dtype == np.float32 and ours.shape == (224, 224, 3)
    assert np.array_equal(ours, theirs)
    shrunk = images.resize_to_input(data.astronaut(), 224)
    theirs = keras.ops.convert_to_numpy(layer(data.astronaut()[None].astype("float32")))[0]
    assert np.array_equal(shrunk, theirs)
    plain = keras.layers.Resizing(224, 224, interpolation="bilinear")
    unsmoothed = keras.ops.convert_to_numpy(plain(data.astronaut()[None].astype("float32")))[0]
    assert not np.allclose(shrunk, unsmoothed, atol=1.0)
    assert 0 <= shrunk.min() and shrunk.max() <= 255


def test_resize_refuses_bad_sizes(photo):
    with pytest.raises(RetrainError, match="Received: size=0"):
        images.resize_to_input(photo, 0)


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
