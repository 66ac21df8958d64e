"""Decoding: every supported format to RGB, draft decoding, resizing, the dataset builder."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain.data import decode, pixel_batches, resizing
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
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def photo():
    return data.chelsea()[:96, :128]


def test_decodes_each_format_to_rgb(tmp_path, photo):
    for format in ("JPEG", "PNG", "BMP", "WEBP", "GIF"):
        path = save(photo, tmp_path / f"x.{format.lower()}", format=format)
        pixels = decode.decode_rgb(path)
        assert pixels.dtype == np.uint8 and pixels.shape == photo.shape, format
        tolerance = {"JPEG": 12, "WEBP": 12, "GIF": 40}.get(format, 0)
        assert np.abs(pixels.astype(int) - photo).mean() <= tolerance, format


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert decode.decode_rgb(path)[0, 0].tolist() == [255, 0, 0]


def test_grayscale_palette_and_cmyk_become_rgb(tmp_path, photo):
    gray = save(photo[..., 1], tmp_path / "gray.png")
    assert (decode.decode_rgb(gray) == photo[..., 1:2]).all()
    palette = tmp_path / "palette.png"
    Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    assert np.abs(decode.decode_rgb(palette).astype(int) - photo).mean() < 8
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(photo).convert("CMYK").save(cmyk, quality=95)
    assert Image.open(cmyk).mode == "CMYK"
    assert np.abs(decode.decode_rgb(cmyk).astype(int) - photo).mean() < 8


def test_alpha_is_composited_on_white(tmp_path, photo):
    rgba = np.dstack([photo, np.zeros(photo.shape[:2], np.uint8)])
    rgba[:, : photo.shape[1] // 2, 3] = 255
    decoded = decode.decode_rgb(save(rgba, tmp_path / "alpha.png"))
    half = photo.shape[1] // 2
    assert (decoded[:, :half] == photo[:, :half]).all()
    assert (decoded[:, half:] == 255).all()
    gray_alpha = Image.fromarray(photo[..., 0]).convert("LA")
    gray_alpha.putalpha(0)
    gray_alpha.save(tmp_path / "la.png")
    assert (decode.decode_rgb(tmp_path / "la.png") == 255).all()
    transparent_gif = Image.new("P", (8, 8), 0)
    transparent_gif.putpalette([0, 0, 0] * 256)
    transparent_gif.save(tmp_path / "t.gif", transparency=0)
    assert (decode.decode_rgb(tmp_path / "t.gif") == 255).all()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 4).astype(np.uint16).reshape(4, 64)
    decoded = decode.decode_rgb(png16(ramp, tmp_path / "gray16.png"))
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert (decoded == expected[..., None]).all()
    assert decoded.max() == 255 and len(np.unique(decoded)) > 200
    colour = np.stack([ramp, ramp[::-1], np.full_like(ramp, 32896)], axis=-1)
    decoded = decode.decode_rgb(png16(colour, tmp_path / "rgb16.png"))
    assert np.abs(decoded.astype(int) - np.round(colour / 257.0)).max() <= 1


def test_exif_orientation_is_applied(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(photo).save(path, exif=exif, quality=95)
    decoded = decode.decode_rgb(path)
    assert decoded.shape == (photo.shape[1], photo.shape[0], 3)
    assert np.abs(decoded.astype(int) - np.rot90(photo, -1)).mean() < 8


def test_one_pixel_image_is_accepted(tmp_path):
    path = save(np.array([[[10, 200, 30]]], np.uint8), tmp_path / "dot.png")
    assert decode.decode_rgb(path).tolist() == [[[10, 200, 30]]]
    resized = resizing.resize_to_input(decode.decode_rgb(path), 224)
    assert resized.shape == (224, 224, 3)
    assert np.allclose(resized, [10, 200, 30])


def test_draft_decoding_keeps_jpeg_sides_at_least_twice_the_target(tmp_path, photo):
    big = np.asarray(Image.fromarray(photo).resize((2000, 1500)))
    path = save(big, tmp_path / "big.jpg", quality=95)
    full = decode.decode_rgb(path)
    small = decode.decode_rgb(path, target_size=224)
    assert full.shape == (1500, 2000, 3)
    assert small.shape == (750, 1000, 3)
    assert decode.decode_rgb(path, target_size=400).shape == (1500, 2000, 3)
    at_input = [resizing.resize_to_input(x, 224) for x in (full, small)]
    assert np.abs(at_input[0] - at_input[1]).mean() < 1.0
    png = save(big, tmp_path / "big.png")
    assert decode.decode_rgb(png, target_size=224).shape == (1500, 2000, 3)


def pillow_pixels(content, target_size):
    """What Pillow alone decodes (the draft as decode_rgb applies it), uint8 [h, w, 3]."""
    with Image.open(io.BytesIO(content)) as image:
        margin = decode.PIXEL_SETTINGS["jpeg_draft_margin"]
        image.draft(None, (margin * target_size,) * 2)
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_simplejpeg_gives_pillows_pixels_at_every_draft_scale(progressive, subsampling):
    rng = np.random.default_rng(subsampling)
    for width, height in [(503, 377), (1999, 1001), (2401, 1799)]:
        buffer = io.BytesIO()
        big = Image.fromarray(data.astronaut()).resize((width, height))
        big.save(
            buffer,
            "JPEG",
            quality=int(rng.integers(60, 98)),
            subsampling=subsampling,
            progressive=progressive,
        )
        content = buffer.getvalue()
        for target in (32, 224, 1000):
            expected = pillow_pixels(content, target)
            decoded = decode.decode_rgb("photo.jpg", target, content=content)
            assert decoded.shape == expected.shape, (width, height, target)
            np.testing.assert_array_equal(decoded, expected)


def test_a_jpeg_simplejpeg_refuses_is_decoded_or_refused_by_pillow(tmp_path, photo, monkeypatch):
    # Extraneous bytes between markers: libjpeg warns, simplejpeg (strict) refuses, Pillow decodes.
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=90)
    content = buffer.getvalue()
    start_of_scan = content.index(b"\xff\xda")
    odd = content[:start_of_scan] + b"\x00\x00" + content[start_of_scan:]
    with pytest.raises(ValueError):
        decode.simplejpeg.decode_jpeg(odd)
    np.testing.assert_array_equal(
        decode.decode_rgb("odd.jpg", content=odd), pillow_pixels(odd, 1 << 20)
    )
    # Pillow's decode gets its own, larger budget check on the way.
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", lambda *args, **kwargs: 1 / 0)
    turbo = decode.decode_memory.peak_bytes(Image.open(io.BytesIO(content)), len(content))
    with pytest.raises(decode.ImageDecodeError, match="memory budget"):
        decode.decode_rgb("x.jpg", content=content, memory_budget=turbo)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("zero.jpg", b"", "empty file"),
        ("text.jpg", b"hello, I am text\n" * 10, "not a JPEG, PNG, GIF, BMP or WebP image"),
        ("fake.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "damaged PNG file"),
    ],
)
def test_bad_bytes_raise_decode_errors_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(decode.ImageDecodeError, match=reason) as raised:
        decode.decode_rgb(path)
    assert str(path) in str(raised.value)
    assert raised.value.path == str(path)
    assert isinstance(raised.value, RetrainError)


def test_truncated_jpeg_and_unsupported_format_raise(tmp_path, photo):
    whole = io.BytesIO()
    Image.fromarray(photo).save(whole, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(decode.ImageDecodeError, match="image file is truncated"):
        decode.decode_rgb(cut)
    tiff = save(photo, tmp_path / "scan.tif")
    with pytest.raises(decode.ImageDecodeError, match="not a JPEG"):
        decode.decode_rgb(tiff)
    with pytest.raises(decode.ImageDecodeError, match="No such file"):
        decode.decode_rgb(tmp_path / "missing.jpg")


def test_decode_from_content_reads_no_file(tmp_path, photo):
    path = save(photo, tmp_path / "x.png")
    content = path.read_bytes()
    path.unlink()
    assert (decode.decode_rgb(path, content=content) == photo).all()


# --- resize_to_input -------------------------------------------------------------


def test_resize_is_the_exported_models_resizing_layer(photo):
    import keras
    import tensorflow as tf
    from sklearn.datasets import load_digits

    layer = keras.layers.Resizing(224, 224, interpolation="bilinear", antialias=True)

    def theirs(pixels):
        return keras.ops.convert_to_numpy(layer(pixels[None].astype("float32")))[0]

    digit = np.repeat(
        (load_digits().images[0] * 16).clip(0, 255).astype(np.uint8)[..., None], 3, -1
    )
    cases = {
        "photo": photo,
        "astronaut, shrunk": data.astronaut(),
        "digit, enlarged": digit,
        "one pixel": photo[:1, :1],
        "panorama": data.coffee()[:50],
        "tall, float input": data.rocket()[:, :80].astype(np.float64),
    }
    for name, pixels in cases.items():
        ours = resizing.resize_to_input(pixels, 224)  # numpy: Pillow's float resampling
        assert ours.dtype == np.float32 and ours.shape == (224, 224, 3), name
        assert np.abs(ours - theirs(pixels)).max() <= resizing.RESIZE_TOLERANCE, name
    # A tensor goes through the layer's own op, exactly.
    in_graph = tf.function(lambda x: resizing.resize_to_input(x, 224))(tf.constant(photo))
    np.testing.assert_array_equal(in_graph.numpy(), theirs(photo))
    # Antialiased: shrinking is smoothed, not sampled.
    shrunk = resizing.resize_to_input(data.astronaut(), 224)
    plain = keras.layers.Resizing(224, 224, interpolation="bilinear")
    unsmoothed = keras.ops.convert_to_numpy(plain(data.astronaut()[None].astype("float32")))[0]
    assert not np.allclose(shrunk, unsmoothed, atol=1.0)
    assert 0 <= shrunk.min() and shrunk.max() <= 255
    batch = resizing.resize_to_input(np.stack([photo, photo[::-1]]), 32)
    np.testing.assert_array_equal(batch[1], resizing.resize_to_input(photo[::-1], 32))


def test_resize_refuses_bad_sizes(photo):
    with pytest.raises(RetrainError, match="Received: size=0"):
        resizing.resize_to_input(photo, 0)
    with pytest.raises(RetrainError, match=r"Received: shape=\(5, 5\)"):
        resizing.resize_to_input(np.zeros((5, 5), np.uint8), 8)


@pytest.fixture
def photo_files(tmp_path, photo):
    """Three real photos and, second, a damaged JPEG."""
    paths = [
        save(photo, tmp_path / "a.jpg"),
        tmp_path / "bad.jpg",
        save(photo[::-1], tmp_path / "b.png"),
        save(photo[:, ::-1], tmp_path / "c.jpg"),
    ]
    paths[1].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return paths


def test_image_batches_keep_order_and_report_failures(photo_files):
    outcomes = {}
    batches = list(
        pixel_batches.image_batches(photo_files, 32, 3, outcomes=outcomes, hash_files=True)
    )
    indices = np.concatenate([b[0].numpy() for b in batches])
    ok = np.concatenate([b[2].numpy() for b in batches])
    assert indices.tolist() == [0, 1, 2, 3] and ok.tolist() == [True, False, True, True]
    pixels = batches[0][1].numpy()
    assert pixels.shape == (3, 32, 32, 3) and pixels.dtype == np.float32
    expected = resizing.resize_to_input(decode.decode_rgb(photo_files[0], 32), 32)
    np.testing.assert_array_equal(pixels[0], expected)
    assert "truncated" in outcomes[1].reason and outcomes[0].reason is None
    assert outcomes[0].state == decode.file_state(photo_files[0])


def test_image_batches_drop_failed_shuffle_and_distort(photo_files):
    import tensorflow as tf

    dataset = pixel_batches.image_batches(
        photo_files,
        16,
        8,
        drop_failed=True,
        shuffle_seed=3,
        distort=lambda image: tf.image.flip_left_right(image),
    )
    # tf.data's autotuner is off (retrain.data.pixel_batches): its teardown stalled runs.
    assert dataset.options().autotune.enabled is False
    assert dataset.map(lambda *batch: batch[1]).options().autotune.enabled is False
    orders = [next(iter(dataset))[0].numpy().tolist() for _ in range(6)]
    assert all(sorted(order) == [0, 2, 3] for order in orders)
    assert len({tuple(order) for order in orders}) > 1, "order must change between epochs"
    index, pixels, _ = next(iter(dataset))
    plain = resizing.resize_to_input(decode.decode_rgb(photo_files[0], 16), 16)
    row = index.numpy().tolist().index(0)
    np.testing.assert_array_equal(pixels.numpy()[row], plain[:, ::-1])


def blank_png(path, width, height):
    """A gray PNG of any size, streamed through zlib so the test never holds its pixels."""
    compressor, row = zlib.compressobj(1), b"\x00" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind, content):
        return (
            struct.pack(">I", len(content))
            + kind
            + content
            + struct.pack(">I", zlib.crc32(kind + content))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_png_over_the_memory_budget_is_refused_before_decoding(tmp_path):
    # 12000 x 12000 = 144 megapixels: under Pillow's bomb limit, over the budget.
    path = blank_png(tmp_path / "huge.png", 12000, 12000)
    with pytest.raises(
        decode.ImageDecodeError, match="12000x12000 PNG needs about 974 MB, the budget is 512 MB"
    ) as raised:
        decode.decode_rgb(path, 224)
    assert raised.value.lasting


def test_the_budget_skips_full_size_decodes_but_not_reduced_jpegs(tmp_path, photo):
    big = np.asarray(Image.fromarray(photo).resize((1000, 1000)))
    png, jpeg = save(big, tmp_path / "big.png"), save(big, tmp_path / "big.jpg")
    budget = 8 * 2**20  # 1000 x 1000 RGB needs 12 MB at full size, 6 MB at JPEG's 1/2 scale
    with pytest.raises(decode.ImageDecodeError, match="1000x1000 PNG needs about 12 MB"):
        decode.decode_rgb(png, 224, memory_budget=budget)
    assert decode.decode_rgb(jpeg, 224, memory_budget=budget).shape == (500, 500, 3)
    with pytest.raises(decode.ImageDecodeError, match="1000x1000 JPEG"):
        decode.decode_rgb(jpeg, None, memory_budget=budget)  # no reduced decode asked for


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs RLIMIT_AS (Unix)")
def test_running_out_of_memory_is_reported_as_such_and_not_lasting(tmp_path):
    """A real MemoryError: the decode runs in a process whose address space is capped."""
    import json
    import subprocess
    import sys

    path = blank_png(tmp_path / "wide.png", 6000, 6000)  # 36 MB gray, 144 MB with RGB
    script = """
import json, re, resource, sys
from retrain.data import decode
size = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 64 * 2**20, resource.RLIM_INFINITY))
try:
    decode.decode_rgb(sys.argv[1], 224)
    print(json.dumps(None))
except decode.ImageDecodeError as error:
    print(json.dumps({"reason": error.reason, "lasting": error.lasting}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome is not None, "decoded within the cap: raise the image size"
    assert outcome["reason"].startswith("out of memory while decoding it")
    assert outcome["lasting"] is False
