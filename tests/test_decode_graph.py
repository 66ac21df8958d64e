"""In-graph decoding (the SavedModel's serving path) against Pillow's decoding (training's)."""

import io
import struct

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain.data import decode, resizing
from retrain.export import decode_graph
from retrain.quiet_tensorflow import import_tensorflow

tf = import_tensorflow()
SIZE = 224


def jpeg(pixels, **options):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def encoded(pixels, format="PNG", **options):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format, **options)
    return buffer.getvalue()


def with_big_endian_exif(content, orientation):
    """The JPEG with a hand-written "MM" (Motorola order) EXIF APP1 segment right after SOI."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    segment = b"Exif\x00\x00" + tiff
    return content[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + content[2:]


# Traced once for the module, as a SavedModel signature would be.
in_graph = tf.function(
    lambda content: decode_graph.decode_image_bytes(content, SIZE),
    input_signature=[tf.TensorSpec([], tf.string)],
)


def compare(content):
    """Largest difference between the graph's pixels and Pillow's, both resized to SIZE.

    Both go through TensorFlow's resize op, so this compares the decoding;
    extraction's own resize (Pillow's, on numpy) is within RESIZE_TOLERANCE.
    """
    pixels = decode.decode_rgb("test image", SIZE, content=content)
    expected = resizing.resize_to_input(tf.constant(pixels), SIZE)
    decoded = in_graph(tf.constant(content)).numpy()
    assert decoded.shape == expected.shape == (SIZE, SIZE, 3)
    extraction = resizing.resize_to_input(pixels, SIZE)
    assert np.abs(extraction - expected).max() <= resizing.RESIZE_TOLERANCE
    return np.abs(decoded - expected).max()


CAT = data.chelsea()  # 300 x 451
LARGE_CAT = np.asarray(Image.fromarray(CAT).resize((1400, 930), Image.BICUBIC))  # libjpeg 1/2 scale
HUGE_CAT = np.asarray(Image.fromarray(CAT).resize((3700, 1900), Image.BILINEAR))  # 1/4 scale


@pytest.mark.parametrize(
    "name, content",
    [
        ("photo", jpeg(CAT)),
        ("decoded at 1/2 scale", jpeg(LARGE_CAT)),
        ("decoded at 1/4 scale", jpeg(HUGE_CAT)),
        ("grayscale JPEG", jpeg(data.camera())),
        ("progressive JPEG", jpeg(CAT, progressive=True)),
    ],
)
def test_jpeg_pixels_are_identical(name, content):
    assert compare(content) == 0, name


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("pixels", [CAT, LARGE_CAT], ids=["full scale", "1/2 scale"])
def test_exif_orientation_is_applied_like_pillow(orientation, pixels):
    exif = Image.Exif()
    exif[0x0112] = orientation
    little_endian = jpeg(pixels, exif=exif.tobytes())
    assert compare(little_endian) == 0
    assert compare(with_big_endian_exif(jpeg(pixels), orientation)) == 0
    if orientation in (5, 6, 7, 8):
        # Really rotated: the stored image would give other pixels.
        rotated, stored = in_graph(little_endian).numpy(), in_graph(jpeg(pixels)).numpy()
        assert np.abs(rotated - stored).max() > 50


@pytest.mark.parametrize(
    "damage",
    [
        (b"MM\x00\x2a", b"XY\x00\x2a"),
        (b"Exif", b"Exig"),
        (b"\x01\x12\x00\x03", b"\x01\x13\x00\x03"),
    ],
)
def test_an_unreadable_exif_orientation_means_none(damage):
    broken = with_big_endian_exif(jpeg(CAT), 6).replace(*damage)
    assert np.array_equal(in_graph(broken).numpy(), in_graph(jpeg(CAT)).numpy())


@pytest.mark.parametrize(
    "name, content, tolerance",
    [
        ("RGB PNG", encoded(data.astronaut()), 0),
        ("grayscale PNG", encoded(data.camera()), 0),
        ("BMP", encoded(CAT, "BMP"), 0),
        ("lossless WebP", encoded(CAT, "WEBP", lossless=True), 0),
        (
            "PNG with alpha",
            encoded(
                np.dstack(
                    [
                        data.astronaut(),
                        np.linspace(0, 255, 512 * 512).reshape(512, 512).astype(np.uint8),
                    ]
                )
            ),
            1.0,
        ),
    ],
)
def test_other_formats_match(name, content, tolerance):
    assert compare(content) <= tolerance, name
