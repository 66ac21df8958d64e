"""Pixels: image files -> RGB arrays -> batches at the backbone's input size.

``decode_rgb`` and ``resize_to_input`` are the one way pixels are made, and
``image_batches`` the one tf.data pipeline built on them: cache extraction,
the distortion and fine-tuning paths and ``label_image`` all take their
pixels from it, so a model sees the same pixels in training and inference.
"""

import contextlib
import dataclasses
import hashlib
import io
import typing

import numpy as np
from PIL import Image, ImageOps

from retrain.files import digests, paths
from retrain.data import tf_data
from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
FORMAT_NAMES = "JPEG, PNG, GIF, BMP or WebP"
SNIFF_BYTES = 16

# Alpha is composited onto this colour: transparent areas of logos and
# cut-outs are usually shown on white, and a fixed colour keeps the pixels the
# same in extraction and inference.
ALPHA_BACKGROUND = (255, 255, 255)

_READ_CHUNK = 1 << 20
_BATCHES_AHEAD = 2

# Everything here that changes the pixels a backbone sees. The bottleneck
# cache's identity includes ``pixel_settings_id()``, so changing any of them
# (or bumping "version" after changing the decoding code) starts a new cache
# file instead of mixing vectors. "jpeg_draft_margin": JPEG draft decoding
# keeps this many times the target side, so that the antialiased resize, not
# libjpeg's DCT scaling, does most of the shrinking.
PIXEL_SETTINGS = {
    "version": 1,
    "jpeg_draft_margin": 2,
    "resize": "Pillow float bilinear (antialiased when shrinking), squashed to a square",
    "alpha_background": list(ALPHA_BACKGROUND),
}
# Largest |Pillow - TensorFlow| of a resized pixel value (of 255) allowed
# between the two implementations of the same resampling (see
# ``resize_to_input``); measured on photos, digits, panoramas and a 1-pixel
# image: at most 3e-3, float32 rounding.
RESIZE_TOLERANCE = 0.01


def pixel_settings_id():
    """"px" + the first 8 hex digits of the sha256 of PIXEL_SETTINGS (as JSON)."""
    return "px" + digests.json_digest(PIXEL_SETTINGS)[:8]


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
# built a strip of rows at a time (``_STRIP_PIXELS``), so conversions never
# hold a whole-image temporary. The resize then holds the RGB pixels, one
# band and its float32 copy (3 + 1 + 4, 5.5 measured beyond the pixels).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_RESIZE_BYTES = 9
# 32-bit "I" images (no supported format gives one in Pillow 13; a plugin
# change could): their whole-image int32 buffer left holes the resize could
# not reuse, 11.3 bytes a pixel measured at the peak.
_EXTRA_BYTES = {"I": 4}
# Decoder state (libjpeg's and zlib's buffers) and small objects: measured
# 1 to 2 MB beyond the pixels on drafted JPEGs.
_FIXED_BYTES = 2 * 2**20
_STRIP_PIXELS = 1 << 17
# A strip's temporaries, per pixel: its crop, the conversion's images and the
# packed RGB bytes; 16-bit gray adds int64 arithmetic (8 bytes a value, 3 at
# once), alpha compositing 3 RGBA images.
_STRIP_BYTES = {"16-bit": 40, "alpha": 24, "other": 12}
# libwebp decodes a frame into its own buffers and Pillow copies it out as
# bytes: about 10 bytes a pixel more (measured 8.2 for RGB, 10.2 for RGBA),
# and a second copy of the file.
_WEBP_BYTES = 11


class ImageDecodeError(RetrainError):
    """An image file that cannot be turned into RGB pixels.

    ``path`` names the file and ``reason`` says why, in words a user can act on.
    ``lasting`` is False when the failure is not the file's (the process ran
    out of memory): the file may decode another time, so it is not remembered
    as a bad image.
    """

    def __init__(self, path, reason, lasting=True):
        super().__init__(f"Cannot decode image {path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.lasting = lasting


def sniff_format(head):
    """The supported format of a file from its first bytes, or None.

    ``head``: the first 16 (or more) bytes of the file.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


class FileState(typing.NamedTuple):
    """What identifies a file's content: size, mtime (ns), sha256 hex digest."""

    size: int
    mtime_ns: int
    sha256: str


def file_state(path):
    """The FileState of ``path``, reading the whole file for the digest."""
    digest = hashlib.sha256()
    with paths.open_regular(path) as (file, size, mtime_ns):  # a FIFO must not block
        while chunk := file.read(_READ_CHUNK):
            digest.update(chunk)
    return FileState(size, mtime_ns, digest.hexdigest())


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How reading one image went: its FileState (None when the file could
    not be read) and, when it gave no pixels, the reason; ``lasting`` False
    when that failure may not happen again (out of memory)."""

    state: typing.Optional[FileState]
    reason: typing.Optional[str]
    lasting: bool = True


def file_too_large(size=None):
    """The reason a file of ``size`` bytes (None: one that grew past the cap while
    it was read) is not read as an image (over MAX_FILE_BYTES)."""
    found = f"{size:,} bytes" if size is not None else "it grew past that while read"
    return (f"file too large ({found}; images over {MAX_FILE_BYTES / 2**20:.0f} MB "
            "are not read): shrink it or save it as JPEG")


def load(path, input_size, with_state=False, *, memory_budget=None):
    """Reads and decodes one image file for a model of input side ``input_size``.

    Never reads more than it checked: the file must be a regular file (see
    ``paths.open_regular``: a FIFO or device put in its place is refused
    without blocking) of at most ``MAX_FILE_BYTES``, and its header (the
    first ``HEADER_BYTES``) must fit ``memory_budget`` (see ``decode_rgb``)
    before the rest is read. The file is read once more, whole, for decoding.

    Returns (uint8 [h, w, 3] pixels or None, Outcome). With ``with_state``
    its FileState is computed from that read (the sha256 covers exactly the
    bytes decoded); a file refused before it was read whole gets size and
    mtime with an empty sha256 (its failure is remembered by size and mtime).
    """
    budget = MEMORY_BUDGET if memory_budget is None else memory_budget
    try:
        with paths.open_regular(path) as (file, size, mtime_ns):
            unread = FileState(size, mtime_ns, "") if with_state else None
            if size > MAX_FILE_BYTES:
                return None, Outcome(unread, file_too_large(size))
            head = file.read(HEADER_BYTES)
            refusal = _header_refusal(path, head, size, input_size, budget)
            if refusal:
                return None, Outcome(unread, refusal)
            content = head
            if len(head) == HEADER_BYTES:
                # Read again from the start into one bytes object (head + rest
                # would hold the file twice). If the file changed meanwhile,
                # decode_rgb checks the header of what was read.
                file.seek(0)
                content = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        return None, Outcome(None, f"cannot read: {error.strerror or error}")
    if len(content) > MAX_FILE_BYTES:  # grew since fstat
        return None, Outcome(None, file_too_large())
    state = None
    if with_state:
        state = FileState(size, mtime_ns, hashlib.sha256(content).hexdigest())
    try:
        pixels = decode_rgb(path, input_size, content=content, memory_budget=budget)
        return pixels, Outcome(state, None)
    except ImageDecodeError as error:
        return None, Outcome(state, error.reason, error.lasting)


def _header_refusal(path, head, file_bytes, target_size, budget):
    """Why an image whose first bytes are ``head`` is refused before its body is read, or None.

    None also when the header does not fit in ``head`` or is damaged: the
    whole file (at most MAX_FILE_BYTES) is then read, and ``decode_rgb``
    checks it before decoding any pixel.
    """
    try:
        with _open_within_budget(path, head, target_size, budget, file_bytes):
            return None
    except ImageDecodeError as error:
        return error.reason
    except Image.DecompressionBombError as error:
        return f"image too large ({error})"
    except Exception:  # noqa: BLE001 - any damage is reported by the full decode
        return None


def _conversion(image):
    """How ``_to_rgb`` converts an image: "16-bit", "alpha" or "other"."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return "16-bit"
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        return "alpha"
    return "other"


def _to_rgb(image):
    """Any Pillow mode of the supported formats -> an RGB image, 8 bits."""
    conversion = _conversion(image)
    if conversion == "16-bit":
        # convert("RGB") clips 16-bit values at 255 instead of scaling them.
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if conversion == "alpha":
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _rgb_pixels(image):
    """uint8 [h, w, 3] RGB of a loaded image, converted a strip of rows at a time.

    Every conversion of ``_to_rgb`` works pixel by pixel, so strips give the
    same pixels as the whole image, while their temporaries (int64 copies of
    16-bit images, the RGBA images of alpha compositing) stay at most
    ``_STRIP_PIXELS`` (or one row) in size instead of several whole images.
    """
    width, height = image.size
    rows = max(1, _STRIP_PIXELS // width)
    pixels = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        strip = image if rows >= height else image.crop((0, top, width, bottom))
        pixels[top:bottom] = np.asarray(_to_rgb(strip))
    return pixels


def peak_bytes(image, file_bytes, full_size=None, target_size=None):
    """Most bytes ``decode_rgb`` and then ``resize_to_input`` need for an image.

    Args:
      image: an opened, not yet loaded Pillow image (JPEG draft already
        applied: its size is the size decoded).
      file_bytes: int, the size of the file (held in memory while decoding).
      full_size: (width, height) before the draft, for progressive JPEGs.
      target_size: the side resized to, or None.

    Returns an int, an upper bound of the peak resident memory measured for
    each mode (see ``_STORED_BYTES``); see ``MEMORY_BUDGET``.
    """
    width, height = image.size
    count = width * height
    stored = _STORED_BYTES.get(image.mode, 4)
    # The image, then either its transposed copy or the RGB result beside it.
    decoding = count * (max(2 * stored, stored + 3) + _EXTRA_BYTES.get(image.mode, 0))
    # A strip's temporaries: see _rgb_pixels (a strip is one row at least).
    decoding += _STRIP_BYTES[_conversion(image)] * min(count, max(_STRIP_PIXELS, width))
    if image.format == "WEBP":
        decoding += count * _WEBP_BYTES + file_bytes
    if image.format == "JPEG" and image.info.get("progressive"):
        decoding += _jpeg_coefficient_bytes(image, full_size or image.size)
    # The resized float32 pixels, and one band's resized image and its copy.
    resizing = count * _RESIZE_BYTES + (target_size or 0) ** 2 * (12 + 4 + 4)
    return _FIXED_BYTES + file_bytes + max(decoding, resizing)


def _jpeg_coefficient_bytes(image, full_size):
    """Bytes libjpeg holds for a progressive JPEG: every DCT coefficient of the
    full-size image (2 bytes each), whatever the draft scale."""
    layers = getattr(image, "layer", None) or [(None, 1, 1, None)] * len(image.getbands())
    most = max(h * v for _, h, v, _ in layers)
    samples = sum(h * v for _, h, v, _ in layers) / most
    return int(2 * samples * full_size[0] * full_size[1])


@contextlib.contextmanager
def _open_within_budget(path, content, target_size, budget, file_bytes=None):
    """Yields the Pillow image of ``content`` (draft applied, not loaded) once
    its ``peak_bytes`` fit ``budget``; raises ImageDecodeError if they do not.

    Pillow's own errors (unidentified, damaged, decompression bomb) propagate.
    """
    with Image.open(io.BytesIO(content), formats=SUPPORTED_FORMATS) as image:
        full_size = image.size
        if target_size and image.format == "JPEG":
            margin = PIXEL_SETTINGS["jpeg_draft_margin"]
            image.draft(None, (margin * target_size,) * 2)
        needed = peak_bytes(image, len(content) if file_bytes is None else file_bytes,
                            full_size, target_size)
        if needed > budget:
            raise ImageDecodeError(
                path, f"too large to decode within the memory budget: "
                f"{full_size[0]}x{full_size[1]} {image.format} needs about "
                f"{needed / 2**20:.0f} MB, the budget is {budget / 2**20:.0f} MB; "
                "shrink it or save it as JPEG")
        yield image


def _read_image(path):
    """The bytes of an image file (a regular file of at most MAX_FILE_BYTES).

    Raises ImageDecodeError when it cannot be read, is not a regular file
    (never blocking on a FIFO) or is too large.
    """
    try:
        with paths.open_regular(path) as (file, size, _):
            if size > MAX_FILE_BYTES:
                raise ImageDecodeError(path, file_too_large(size))
            content = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise ImageDecodeError(path, f"cannot read: {error.strerror or error}") from None
    if len(content) > MAX_FILE_BYTES:
        raise ImageDecodeError(path, file_too_large())
    return content


def decode_rgb(path, target_size=None, *, content=None, memory_budget=None):
    """Decodes an image file into RGB pixels.

    Applies the EXIF orientation, takes the first frame of animations,
    scales 16-bit images to 8 bits, converts grayscale, palette and CMYK to
    RGB and composites alpha onto white (``ALPHA_BACKGROUND``).

    Args:
      path: the image file (str or Path).
      target_size: the square side the pixels will be resized to, or None.
        When given, a JPEG is decoded at the smallest libjpeg scale (1/2, 1/4,
        1/8) whose sides all stay at least twice ``target_size``: several
        times faster for camera photos. It changes the pixels slightly (on
        photos, Lite0 bottlenecks moved by under 5% relative L2; with no
        2x margin, by up to 12%), so every caller that feeds the same model
        (extraction, label_image) must pass the same value.
      content: the file's bytes when the caller has read them already;
        ``path`` then only names the file in errors.
      memory_budget: most bytes the decode may need (default
        ``MEMORY_BUDGET``). Formats without a reduced-size decode (PNG, GIF,
        BMP, WebP), and JPEGs still too large at their reduced size, that
        would need more are refused before any pixel is decoded.

    Returns:
      np.ndarray uint8 [height, width, 3], values in [0, 255].

    Raises:
      ImageDecodeError naming the file and the reason; with ``lasting``
      False when the process ran out of memory.
    """
    budget = MEMORY_BUDGET if memory_budget is None else memory_budget
    try:
        if content is None:
            content = _read_image(path)
        if not content:
            raise ImageDecodeError(path, "empty file")
        with _open_within_budget(path, content, target_size, budget) as image:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return _rgb_pixels(image)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError:
        format = sniff_format(content[:SNIFF_BYTES])
        reason = f"damaged {format} file" if format else f"not a {FORMAT_NAMES} image"
        raise ImageDecodeError(path, reason) from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(path, f"image too large ({error})") from None
    except MemoryError:
        raise ImageDecodeError(
            path, "out of memory while decoding it (other work may have held the memory; "
            "it is tried again next run)", lasting=False) from None
    except OSError as error:
        raise ImageDecodeError(path, f"unreadable or truncated ({error})") from None
    # Pillow's decoders raise many types (SyntaxError, ValueError, EOFError,
    # struct.error, ...) on damaged files; one damaged file must not stop a run.
    except Exception as error:  # noqa: BLE001
        raise ImageDecodeError(
            path, f"damaged image ({type(error).__name__}: {error})"
        ) from None


def resize_to_input(image, size):
    """Resizes pixels to ``size`` x ``size`` as the exported model does.

    The exported model runs ``keras.layers.Resizing(size, size,
    interpolation="bilinear", antialias=True)``: a float32 cast, then
    ``tf.image.resize`` bilinear with antialiasing, the triangle filter
    widened by the shrink factor. The aspect ratio is squashed, not cropped.

    A tf.Tensor (inside tf.function or tf.data) goes through that op. A numpy
    array goes through Pillow's float resampling of each channel (BILINEAR,
    which widens the same triangle filter when shrinking): the same pixels
    within ``RESIZE_TOLERANCE`` (float32 rounding), in less CPU time (2.0
    against 2.8 ms for a 500x375 photo, ``benchmarks/profile_extraction.py``)
    and without holding the GIL: a cache fill spent more time in
    TensorFlow's resize than in decoding the JPEG.

    Args:
      image: uint8 or float [height, width, 3] (or [batch, height, width, 3])
        RGB values in [0, 255]; numpy or a tf.Tensor.
      size: int, the backbone's input side.

    Returns:
      float32 [size, size, 3] values in [0, 255] (with the batch dimension if
      given): np.ndarray for a numpy array, a tf.Tensor for a tf.Tensor.
    """
    if not isinstance(size, int) or size < 1:
        raise RetrainError(f"size must be a positive int. Received: size={size!r}")
    if isinstance(image, np.ndarray):
        if image.ndim == 4:
            return np.stack([_resize_with_pillow(one, size) for one in image])
        return _resize_with_pillow(image, size)
    # Imported here: discovery and decoding must not pay for (or print) the
    # TensorFlow start-up.
    tf = import_tensorflow()
    resized = tf.image.resize(
        tf.cast(image, tf.float32), (size, size), method="bilinear", antialias=True
    )
    return resized.numpy() if tf.executing_eagerly() else resized


def _resize_with_pillow(pixels, size):
    """float32 [size, size, 3] of one [h, w, 3] image (see ``resize_to_input``)."""
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise RetrainError(f"Pixels must be [height, width, 3]. Received: shape={pixels.shape}")
    # One band at a time, through one reused uint8 buffer that Pillow maps
    # rather than copies: float32 copies of all three bands (12 bytes a pixel)
    # would be the largest buffer of a whole decode; a new buffer per band
    # left the allocator's holes too small for the next band (9 bytes a pixel
    # measured, 5.5 now).
    height, width = pixels.shape[:2]
    resized = np.empty((size, size, 3), np.float32)
    band = np.empty((height, width), np.uint8 if pixels.dtype == np.uint8 else np.float32)
    for channel in range(3):
        band[...] = pixels[..., channel]
        if band.dtype == np.uint8:  # L, then F: the values Pillow's split gave
            image = Image.frombuffer("L", (width, height), band, "raw", "L", 0, 1).convert("F")
        else:
            image = Image.fromarray(band)
        resized[..., channel] = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
        del image  # before the next band is written into the buffer it may map
    return resized


def image_batches(paths, input_size, batch_size, *, distort=None, outcomes=None,
                  hash_files=False, shuffle_seed=None, drop_failed=False):
    """The one dataset builder: image files -> batches of model-ready pixels.

    Reading and decoding (Pillow, ``decode_rgb``) and resizing run on tf.data's
    thread pool (both release the GIL), two batches are prefetched, so whoever
    consumes the batches (a backbone, a training step) rarely waits, and
    memory does not grow with the number of images.

    Args:
      paths: sequence of image file paths (str or Path).
      input_size: int, the backbone's square input side.
      batch_size: int, images per batch (the last batch may be smaller).
      distort: None, or a function float32 [input_size, input_size, 3] RGB in
        [0, 255] -> the same shape and range, built from TensorFlow ops and
        run per image after resizing; random ops draw anew every epoch.
      outcomes: None, or a dict this fills from index (into ``paths``) to
        ``Outcome`` for every image read. The consumer pops entries as it
        uses them.
      hash_files: give every Outcome the file's FileState (size, mtime and
        the sha256 of exactly the bytes decoded); costs a hash per image.
      shuffle_seed: None keeps the order of ``paths``; an int shuffles it,
        anew at every iteration (epoch), reproducibly.
      drop_failed: leave images that cannot be read or decoded out of the
        batches (training); otherwise they ride along as black images with
        ``ok`` False (cheaper than re-batching, and the caller can report them).

    Returns:
      tf.data.Dataset of (index int64 [b], pixels float32 [b, input_size,
      input_size, 3] RGB in [0, 255], ok bool [b]).
    """
    tf = import_tensorflow()
    paths = [str(path) for path in paths]

    def read(index):
        index = int(index)
        pixels, outcome = load(paths[index], input_size, hash_files)
        if outcomes is not None:
            outcomes[index] = outcome
        if pixels is None:
            return np.zeros((input_size, input_size, 3), np.float32), False
        return resize_to_input(pixels, input_size), True

    def prepare(index):
        pixels, ok = tf.numpy_function(read, [index], [tf.float32, tf.bool])
        pixels.set_shape([input_size, input_size, 3])
        ok.set_shape([])
        if distort is not None:
            pixels = distort(pixels)
        return index, pixels, ok

    dataset = tf.data.Dataset.range(len(paths))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=shuffle_seed is None)
    if drop_failed:
        dataset = dataset.filter(lambda index, pixels, ok: ok)
    # A fixed prefetch, not AUTOTUNE (whose buffer may grow with free RAM):
    # memory stays flat in the number of images, and two ready batches are
    # enough to keep a consumer that is slower than decoding busy.
    return tf_data.finished(dataset.batch(batch_size).prefetch(_BATCHES_AHEAD))
