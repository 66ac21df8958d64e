"""Image bytes -> model-ready pixels with TensorFlow ops only, for graphs that take files.

`decode_image_bytes` reproduces `retrain.data.decode.decode_rgb` + `resize_to_input`
(Pillow) inside a TensorFlow graph, so the SavedModel's serving signature sees
the pixels training saw:

- JPEG: decoded at the reduced libjpeg scale Pillow's draft mode picks, with
  the accurate integer IDCT Pillow uses (libjpeg's default; TensorFlow's
  default is the fast one, several levels off): the decoded pixels are
  bit-identical. The resize is TensorFlow's op, which extraction's Pillow
  resampling matches within `resizing.RESIZE_TOLERANCE` (one level: Pillow
  rounds its uint8 result).
  The EXIF orientation (APP1 segment, IFD0 tag 0x0112) is applied as
  `PIL.ImageOps.exif_transpose` does.
- PNG, BMP, GIF (first frame), WebP: gray becomes RGB, alpha is composited
  onto white (`decode.ALPHA_BACKGROUND`), at most 1 level off from Pillow's
  rounding.
- Not reproduced: CMYK JPEGs, 16-bit PNGs (TensorFlow keeps the high byte,
  Pillow rounds: 1 level off), EXIF orientation outside JPEGs.
"""

from retrain.data.decode import ALPHA_BACKGROUND, PIXEL_SETTINGS
from retrain.data.resizing import resize_to_input
from retrain.quiet_tensorflow import import_tensorflow

tf = import_tensorflow()

# decode_rgb asks Pillow's JPEG draft mode for sides of at least the draft margin
# times the input side; Pillow then takes the smallest of these libjpeg scales
# (1/1 .. 1/8) that keeps them.
_JPEG_RATIOS = (1, 2, 4, 8)


def decode_image_bytes(content, size: int):
    """One encoded image -> float32 [size, size, 3] RGB in [0, 255].

    A tf.Tensor inside a graph (its purpose), an np.ndarray when run eagerly.

    Args:
      content: tf.string scalar, the bytes of a JPEG, PNG, BMP, GIF or WebP file.
      size: the backbone's square input side.
    """
    return resize_to_input(
        tf.cond(
            tf.io.is_jpeg(content),
            lambda: _decode_jpeg(content, size),
            lambda: _decode_other(content),
        ),
        size,
    )


def _decode_jpeg(content, size):
    """float32 [h, w, 3] in [0, 255]: Pillow's draft scale (sides >= 2 x size), its ISLOW IDCT,
    the EXIF orientation."""
    height, width = tf.unstack(tf.io.extract_jpeg_shape(content)[:2])
    margin = PIXEL_SETTINGS["jpeg_draft_margin"]
    fits = tf.minimum(width // (margin * size), height // (margin * size))
    branch = tf.add_n([tf.cast(fits >= ratio, tf.int32) for ratio in _JPEG_RATIOS[1:]])
    image = tf.switch_case(
        branch,
        [
            lambda ratio=ratio: tf.io.decode_jpeg(
                content, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE"
            )
            for ratio in _JPEG_RATIOS
        ],
    )
    # Oriented as float: TensorFlow's uint8 transpose logs a oneDNN warning on some CPUs.
    return _orient(tf.cast(image, tf.float32), _exif_orientation(content))


# PIL.ImageOps.exif_transpose's transposition for EXIF orientations 1-8.
_ORIENTATIONS = (
    lambda image: image,
    tf.image.flip_left_right,  # FLIP_LEFT_RIGHT
    lambda image: tf.image.rot90(image, 2),  # ROTATE_180
    tf.image.flip_up_down,  # FLIP_TOP_BOTTOM
    tf.image.transpose,  # TRANSPOSE
    lambda image: tf.image.rot90(image, 3),  # ROTATE_270 (clockwise 90)
    lambda image: tf.image.rot90(tf.image.transpose(image), 2),  # TRANSVERSE
    lambda image: tf.image.rot90(image, 1),  # ROTATE_90 (counter-clockwise)
)
# APP1 segments are at most 64 KB and come right after the start marker and
# any other APPn segments; the walk gives up after this many segments.
_EXIF_SEARCH_BYTES = 1 << 17
_EXIF_SEARCH_SEGMENTS = 16
_IFD_ENTRIES = 64


def _orient(image, orientation):
    return tf.switch_case(orientation - 1, [lambda f=f: f(image) for f in _ORIENTATIONS])


def _exif_orientation(content):
    """int32 scalar 1-8: the JPEG's EXIF orientation tag, 1 when absent or unreadable."""
    head = tf.cast(
        tf.io.decode_raw(tf.strings.substr(content, 0, _EXIF_SEARCH_BYTES), tf.uint8), tf.int32
    )
    head = tf.concat([head, tf.zeros([16], tf.int32)], 0)  # reads past the end see zeros
    last = tf.size(head) - 1

    def byte(position):
        return tf.gather(head, tf.clip_by_value(position, 0, last))

    def segment_walk(position, tiff, step):
        """From one APPn marker to the next until the Exif one is found."""
        is_exif = (byte(position + 1) == 0xE1) & tf.reduce_all(
            tf.stack([byte(position + 4 + i) for i in range(6)]) == tf.constant(list(b"Exif\0\0"))
        )
        length = byte(position + 2) * 256 + byte(position + 3)
        return (position + 2 + length, tf.where(is_exif, position + 10, tiff), step + 1)

    def keep_walking(position, tiff, step):
        is_app = (
            (byte(position) == 0xFF) & (byte(position + 1) >= 0xE0) & (byte(position + 1) <= 0xEF)
        )
        return is_app & (tiff < 0) & (step < _EXIF_SEARCH_SEGMENTS)

    _, tiff, _ = tf.while_loop(
        keep_walking, segment_walk, (tf.constant(2), tf.constant(-1), tf.constant(0))
    )
    little = (byte(tiff) == ord("I")) & (byte(tiff + 1) == ord("I"))
    big = (byte(tiff) == ord("M")) & (byte(tiff + 1) == ord("M"))

    def integer(position, width):
        digits = [byte(position + i) for i in range(width)]
        order = digits[::-1] if width > 1 else digits
        big_endian = tf.foldl(lambda total, digit: total * 256 + digit, tf.stack(digits))
        little_endian = tf.foldl(lambda total, digit: total * 256 + digit, tf.stack(order))
        return tf.where(little, little_endian, big_endian)

    ifd = tiff + integer(tiff + 4, 4)
    count = integer(ifd, 2)
    entries = ifd + 2 + 12 * tf.range(_IFD_ENTRIES)
    tags = integer(entries, 2)
    found = (tags == 0x0112) & (tf.range(_IFD_ENTRIES) < count)
    values = integer(entries + 8, 2)
    orientation = tf.reduce_max(tf.where(found, values, 0))
    valid = (tiff >= 0) & (little | big) & (orientation >= 1) & (orientation <= 8)
    return tf.where(valid, orientation, 1)


def _decode_other(content):
    """float32 [h, w, 3] in [0, 255] of a PNG, BMP, GIF or WebP: gray -> RGB, alpha composited onto
    white and rounded to whole levels as Pillow does."""
    image = tf.io.decode_image(content, expand_animations=False)
    image.set_shape([None, None, None])
    channels = tf.shape(image)[-1]
    pixels = tf.cast(image, tf.float32)
    color = tf.cond(
        channels >= 3, lambda: pixels[..., :3], lambda: tf.tile(pixels[..., :1], [1, 1, 3])
    )
    alpha = tf.cond(
        channels % 2 == 0, lambda: pixels[..., -1:] / 255.0, lambda: tf.ones_like(pixels[..., :1])
    )
    background = tf.constant(ALPHA_BACKGROUND, tf.float32)
    return tf.round(color * alpha + background * (1.0 - alpha))
