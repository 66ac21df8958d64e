"""Resizing pixels to the backbone's square input, as the exported model does.

``resize_to_input`` is the one resize: a tf.Tensor goes through TensorFlow's
antialiased bilinear resize (the exported model's Resizing layer), a numpy
array through Pillow's equivalent resampling (within ``RESIZE_TOLERANCE``).
"""

import numpy as np
from PIL import Image

from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow

# Largest |Pillow - TensorFlow| of a resized pixel value (of 255) allowed
# between the two implementations of the same resampling (see
# ``resize_to_input``): Pillow resamples uint8 pixels in fixed point and
# rounds to whole levels (measured at most 0.998 on photos, digits,
# panoramas and a 1-pixel image; float pixels: 3e-3, float32 rounding).
RESIZE_TOLERANCE = 1.0


def resize_to_input(image, size):
    """Resizes pixels to ``size`` x ``size`` as the exported model does.

    The exported model runs ``keras.layers.Resizing(size, size,
    interpolation="bilinear", antialias=True)``: a float32 cast, then
    ``tf.image.resize`` bilinear with antialiasing, the triangle filter
    widened by the shrink factor. The aspect ratio is squashed, not cropped.

    A tf.Tensor (inside tf.function or tf.data) goes through that op. A numpy
    array goes through Pillow's BILINEAR resampling, which widens the same
    triangle filter when shrinking: uint8 pixels in one call over the three
    bands, in fixed point, rounded to whole levels (within
    ``RESIZE_TOLERANCE`` of TensorFlow's); float pixels band by band in
    float32. Every path that feeds a model (extraction, training,
    ``label_image``) passes uint8 pixels, so they all see the same values.
    The uint8 resize takes 1.26 ms for a 500x375 photo against 3.13 ms for
    the float one (``benchmarks/profile_extraction.py``), without holding
    the GIL: a cache fill spent more time resizing than decoding the JPEG.

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
    height, width = pixels.shape[:2]
    if pixels.dtype == np.uint8:
        return resize_uint8(pixels, size).astype(np.float32)
    # Float pixels: one band at a time in Pillow's float mode, through one
    # reused buffer (float32 copies of all three bands would be the largest
    # buffer of the resize).
    resized = np.empty((size, size, 3), np.float32)
    band = np.empty((height, width), np.float32)
    for channel in range(3):
        band[...] = pixels[..., channel]
        image = Image.fromarray(band)
        resized[..., channel] = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
        del image  # before the next band is written into the buffer it may map
    return resized


def resize_uint8(pixels, size):
    """uint8 [size, size, 3] of uint8 [h, w, 3] RGB pixels: ``resize_to_input``'s
    values (whole levels), for a consumer that takes uint8 (the cache fill
    hands batches a quarter the size of float32 ones between threads)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise RetrainError(
            f"Pixels must be uint8 [height, width, 3]. Received: {pixels.dtype} {pixels.shape}"
        )
    height, width = pixels.shape[:2]
    # One call over the three bands, in Pillow's fixed-point arithmetic.
    image = Image.frombuffer(
        "RGB", (width, height), np.ascontiguousarray(pixels), "raw", "RGB", 0, 1
    )
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
