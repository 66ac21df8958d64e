"""Decoding: an image file -> uint8 RGB pixels, within a memory budget.

``decode_rgb`` (with ``load``, which reads the file once and can hash it) is
the one way pixels are made from a file; ``resizing.resize_to_input`` brings
them to the backbone's input and ``pixel_batches.image_batches`` is the one
tf.data pipeline built on both, so a model sees the same pixels in training
and inference. What a decode may cost is ``decode_memory``'s.
"""

import contextlib
import dataclasses
import hashlib
import io
import typing

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from retrain.data import decode_memory
from retrain.data.decode_memory import (
    HEADER_BYTES,
    MAX_FILE_BYTES,
    MEMORY_BUDGET,
    conversion_kind,
    file_too_large,
    peak_bytes,
)
from retrain.errors import RetrainError
from retrain.files import digests, paths

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
FORMAT_NAMES = "JPEG, PNG, GIF, BMP or WebP"
SNIFF_BYTES = 16

# Alpha is composited onto this colour: transparent areas of logos and
# cut-outs are usually shown on white, and a fixed colour keeps the pixels the
# same in extraction and inference.
ALPHA_BACKGROUND = (255, 255, 255)

_READ_CHUNK = 1 << 20

# Files up to this size are read whole before their header is checked (see ``load``).
WHOLE_READ_BYTES = 1 << 20

# Everything here that changes the pixels a backbone sees. The bottleneck
# cache's identity includes ``pixel_settings_id()``, so changing any of them
# (or bumping "version" after changing the decoding code) starts a new cache
# file instead of mixing vectors. "jpeg_draft_margin": JPEG draft decoding
# keeps this many times the target side, so that the antialiased resize, not
# libjpeg's DCT scaling, does most of the shrinking.
PIXEL_SETTINGS = {
    "version": 2,
    "jpeg_draft_margin": 2,
    "resize": "Pillow uint8 bilinear (antialiased when shrinking), squashed to a square",
    "alpha_background": list(ALPHA_BACKGROUND),
}


def pixel_settings_id():
    """ "px" + the first 8 hex digits of the sha256 of PIXEL_SETTINGS (as JSON)."""
    return "px" + digests.json_digest(PIXEL_SETTINGS)[:8]


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


def load(path, input_size, with_state=False, *, memory_budget=None):
    """Reads and decodes one image file for a model of input side ``input_size``.

    Never reads more than it checked: the file must be a regular file (see
    ``paths.open_regular``: a FIFO or device put in its place is refused
    without blocking) of at most ``MAX_FILE_BYTES``; a file larger than
    ``WHOLE_READ_BYTES`` must have a header (its first ``HEADER_BYTES``) that
    fits ``memory_budget`` (see ``decode_rgb``) before the rest is read, and
    is then read once more, whole, for decoding.

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
            if size > WHOLE_READ_BYTES:
                # A large file's header is checked before the rest is read. A
                # smaller one is read at once: ``decode_rgb`` checks its
                # header before decoding any pixel, and parsing it twice cost
                # more than reading it.
                refusal = _header_refusal(path, file.read(HEADER_BYTES), size, input_size, budget)
                if refusal:
                    return None, Outcome(unread, refusal)
                file.seek(0)
            # One bytes object; if the file changed since fstat, decode_rgb
            # checks the header of what was read.
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


def _to_rgb(image):
    """Any Pillow mode of the supported formats -> an RGB image, 8 bits."""
    conversion = conversion_kind(image)
    if conversion == "16-bit":
        # convert("RGB") clips 16-bit values at 255 instead of scaling them.
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if conversion == "alpha":
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # An RGB image as it is: convert() would copy it (0.1 ms of a 500x375 photo).
    return image if image.mode == "RGB" else image.convert("RGB")


def rgb_pixels(image):
    """uint8 [h, w, 3] RGB of a loaded image, converted a strip of rows at a time.

    Every conversion of ``_to_rgb`` works pixel by pixel, so strips give the
    same pixels as the whole image, while their temporaries (int64 copies of
    16-bit images, the RGBA images of alpha compositing) stay at most
    ``decode_memory.STRIP_PIXELS`` (or one row) in size instead of several whole images.
    """
    width, height = image.size
    rows = max(1, decode_memory.STRIP_PIXELS // width)
    pixels = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        strip = image if rows >= height else image.crop((0, top, width, bottom))
        pixels[top:bottom] = np.asarray(_to_rgb(strip))
    return pixels


@contextlib.contextmanager
def _open_within_budget(path, content, target_size, budget, file_bytes=None, turbo=True):
    """Yields the Pillow image of ``content`` (draft applied, not loaded) once
    its ``peak_bytes`` fit ``budget``; raises ImageDecodeError if they do not.

    Pillow's own errors (unidentified, damaged, decompression bomb) propagate.
    """
    with Image.open(io.BytesIO(content), formats=SUPPORTED_FORMATS) as image:
        full_size = image.size
        if target_size and image.format == "JPEG":
            margin = PIXEL_SETTINGS["jpeg_draft_margin"]
            image.draft(None, (margin * target_size,) * 2)
        needed = peak_bytes(
            image,
            len(content) if file_bytes is None else file_bytes,
            full_size,
            target_size,
            turbo,
        )
        if needed > budget:
            raise ImageDecodeError(
                path,
                f"too large to decode within the memory budget: "
                f"{full_size[0]}x{full_size[1]} {image.format} needs about "
                f"{needed / 2**20:.0f} MB, the budget is {budget / 2**20:.0f} MB; "
                "shrink it or save it as JPEG",
            )
        yield image


def _pillow_pixels(image):
    """uint8 [h, w, 3] of an image opened by ``_open_within_budget``, decoded by Pillow."""
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return rgb_pixels(image)


def _turbo_jpeg_pixels(image, content):
    """uint8 [h, w, 3] of a plain colour JPEG decoded by simplejpeg, or None.

    The same libjpeg-turbo decode as Pillow's (ISLOW IDCT, fancy upsampling,
    the draft's 1/2, 1/4 or 1/8 scale): the same pixels, bit for bit
    (tests/test_decode.py compares them), in about 0.6 of the time, written
    straight into an RGB array (Pillow stores 4 bytes a pixel, then copies)
    and with the GIL released throughout. None for a file simplejpeg finds
    anything wrong with: Pillow's path then decodes it, or words its error,
    as before.

    ``image``: opened by ``_open_within_budget``, not loaded (draft applied),
    one that ``decode_memory.turbo_decodes``.
    """
    scale = image.decoderconfig[0] if image.decoderconfig else 1
    width, height = image.size
    try:
        pixels = simplejpeg.decode_jpeg(
            content, "RGB", min_factor=scale, min_height=height, min_width=width
        )
    except MemoryError:
        raise  # decode_rgb's: not the file's fault, tried again next run
    except Exception:  # noqa: BLE001 - Pillow's path words the problem
        return None
    return pixels if pixels.shape == (height, width, 3) else None


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
            if not decode_memory.turbo_decodes(image):
                return _pillow_pixels(image)
            pixels = _turbo_jpeg_pixels(image, content)
            if pixels is not None:
                return pixels
        # simplejpeg refused it: Pillow decodes it (or words the problem),
        # within the budget of its own decode.
        with _open_within_budget(path, content, target_size, budget, turbo=False) as image:
            return _pillow_pixels(image)
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
            path,
            "out of memory while decoding it (other work may have held the memory; "
            "it is tried again next run)",
            lasting=False,
        ) from None
    except OSError as error:
        raise ImageDecodeError(path, f"unreadable or truncated ({error})") from None
    # Pillow's decoders raise many types (SyntaxError, ValueError, EOFError,
    # struct.error, ...) on damaged files; one damaged file must not stop a run.
    except Exception as error:  # noqa: BLE001
        raise ImageDecodeError(path, f"damaged image ({type(error).__name__}: {error})") from None
