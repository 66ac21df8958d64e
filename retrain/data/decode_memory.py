"""How much memory decoding one image may take, estimated before any pixel is decoded.

`peak_bytes` bounds the resident memory of ``decode.decode_rgb`` followed by
``resizing.resize_to_input`` for an opened (not loaded) Pillow image, from
per-pixel costs measured for each mode; a decode whose estimate exceeds
``MEMORY_BUDGET`` is refused. ``MAX_FILE_BYTES`` and ``HEADER_BYTES`` bound
what is read of a file at all.
"""

# Most memory one image's decode and resize may need (``peak_bytes``).
# Decodes run on several threads at once, so this is per image. A
# 24-megapixel RGBA PNG needs about 200 MB; JPEGs are decoded at reduced
# scale (draft) and rarely come near it.
MEMORY_BUDGET = 512 * 2**20

# Largest image file read at all; larger ones are skipped unread. A real photo
# stays far below: a 100-megapixel camera JPEG is about 50 MB, a 50-megapixel
# 8-bit RGBA PNG at most about 200 MB. And a PNG, GIF, BMP or WebP file is
# rarely larger than its raw pixels, so one over half the budget would need
# more than MEMORY_BUDGET to decode anyway (its pixels, then as RGB). It is
# what keeps a sparse 64 GB "x.jpg" (or a device linked as one) from being
# read into memory.
MAX_FILE_BYTES = MEMORY_BUDGET // 2

# The first bytes of a file, read to check its header (dimensions, mode)
# against the budget before the rest is read. Headers of camera JPEGs with
# EXIF thumbnails fit; a file whose header does not is checked once read whole
# (still at most MAX_FILE_BYTES).
HEADER_BYTES = 64 * 1024

# Peak memory of a decode, in bytes per pixel at the size decoded (measured:
# ``tests/test_hostile_images.py`` checks ``peak_bytes`` against the peak RSS
# of a real decode and resize for each mode). Pillow keeps 1 byte a pixel for
# "1", "L" and "P" images, 2 for 16-bit gray and 4 for every other mode (RGB
# too). Decoding holds the file's bytes, the image in its mode, a transposed
# copy while the EXIF orientation is applied, then the uint8 RGB result (3)
# built a strip of rows at a time (``STRIP_PIXELS``), so conversions never
# hold a whole-image temporary. A plain colour JPEG is decoded by simplejpeg
# straight into the RGB result (``turbo_decodes``). The resize then holds
# the RGB pixels and Pillow's 4-byte copy of them (3 + 4).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_RESIZE_BYTES = 7
# Decoder state (libjpeg's and zlib's buffers) and small objects: measured
# 1 to 2 MB beyond the pixels on drafted JPEGs.
_FIXED_BYTES = 2 * 2**20
STRIP_PIXELS = 1 << 17
# A strip's temporaries, per pixel: its crop, the conversion's images and the
# packed RGB bytes; 16-bit gray adds int64 arithmetic (8 bytes a value, 3 at
# once), alpha compositing 3 RGBA images.
_STRIP_BYTES = {"16-bit": 40, "alpha": 24, "other": 12}
# libwebp decodes a frame into its own buffers and Pillow copies it out as
# bytes: about 10 bytes a pixel more (measured 8.2 for RGB, 10.2 for RGBA),
# and a second copy of the file.
_WEBP_BYTES = 11


def file_too_large(size=None):
    """The reason a file of ``size`` bytes (None: one that grew past the cap while
    it was read) is not read as an image (over MAX_FILE_BYTES)."""
    found = f"{size:,} bytes" if size is not None else "it grew past that while read"
    return (
        f"file too large ({found}; images over {MAX_FILE_BYTES / 2**20:.0f} MB "
        "are not read): shrink it or save it as JPEG"
    )


def conversion_kind(image):
    """How ``decode._to_rgb`` converts an image: "16-bit", "alpha" or "other"."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return "16-bit"
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        return "alpha"
    return "other"


# EXIF tag of the orientation (``ImageOps.exif_transpose`` applies it).
ORIENTATION_TAG = 0x0112


def turbo_decodes(image):
    """Whether ``decode`` gives simplejpeg an opened image: a JPEG in colour
    (YCbCr or RGB, not CMYK or gray) without an EXIF orientation to apply."""
    return (
        image.format == "JPEG"
        and image.mode == "RGB"
        and image.getexif().get(ORIENTATION_TAG, 1) == 1
    )


def peak_bytes(image, file_bytes, full_size=None, target_size=None, turbo=True):
    """Most bytes ``decode.decode_rgb`` and then ``resizing.resize_to_input`` need for an image.

    Args:
      image: an opened, not yet loaded Pillow image (JPEG draft already
        applied: its size is the size decoded).
      file_bytes: int, the size of the file (held in memory while decoding).
      full_size: (width, height) before the draft, for progressive JPEGs.
      target_size: the side resized to, or None.
      turbo: whether simplejpeg decodes the image if it can (``turbo_decodes``);
        False for Pillow's decode.

    Returns an int, an upper bound of the peak resident memory measured for
    each mode (see ``_STORED_BYTES``); see ``MEMORY_BUDGET``.
    """
    width, height = image.size
    count = width * height
    stored = _STORED_BYTES.get(image.mode, 4)
    if turbo and turbo_decodes(image):
        decoding = 3 * count  # the RGB result, written by libjpeg-turbo
    else:
        # The image, then either its transposed copy or the RGB result beside it.
        decoding = count * max(2 * stored, stored + 3)
        # A strip's temporaries: see decode.rgb_pixels (a strip is one row at least).
        decoding += _STRIP_BYTES[conversion_kind(image)] * min(count, max(STRIP_PIXELS, width))
    if image.format == "WEBP":
        decoding += count * _WEBP_BYTES + file_bytes
    if image.format == "JPEG" and image.info.get("progressive"):
        decoding += _jpeg_coefficient_bytes(image, full_size or image.size)
    # Pillow's horizontal pass (4 bytes a pixel), its result and the float32 copy.
    resizing = count * _RESIZE_BYTES + height * (target_size or 0) * 4
    resizing += (target_size or 0) ** 2 * (4 + 12)
    # The file's bytes are let go once decoded (``decode.load`` returns the pixels).
    return _FIXED_BYTES + max(file_bytes + decoding, resizing)


def _jpeg_coefficient_bytes(image, full_size):
    """Bytes libjpeg holds for a progressive JPEG: every DCT coefficient of the
    full-size image (2 bytes each), whatever the draft scale."""
    layers = getattr(image, "layer", None) or [(None, 1, 1, None)] * len(image.getbands())
    most = max(h * v for _, h, v, _ in layers)
    samples = sum(h * v for _, h, v, _ in layers) / most
    return int(2 * samples * full_size[0] * full_size[1])
