"""What `Classifier.predict` takes -> the pixels the model takes, decoded as training decoded.

An image is a file path (str or os.PathLike), a PIL image, or an array
[height, width, 3] of RGB values in [0, 255] (uint8, or any integer or float
type; floats are NOT in [0, 1]). Files go through `pixel_batches.image_batches`
(the decoding and resizing of extraction and label_image); a PIL image gets
the same conversion to RGB (EXIF orientation applied, alpha composited on
white, 16-bit scaled to 8 bits) and an array is taken as RGB, and both are
resized by `resizing.resize_to_input`, as files are.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from retrain.errors import RetrainError


def as_list(images: Any) -> list:
    """One image or a sequence of them -> a list of images ([n, h, w, 3] arrays: n images)."""
    if isinstance(images, (str, os.PathLike)) or _is_pil(images):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    try:
        return list(images)
    except TypeError:
        raise RetrainError(
            "images must be a file path, a PIL image, an array [height, width, 3] or a list of "
            f"them. Received: images of type {type(images).__name__}"
        ) from None


def is_path(image: Any) -> bool:
    return isinstance(image, (str, os.PathLike))


def pixels_of(images: list, size: int, batch_size: int) -> Iterator[tuple[Any, str | None]]:
    """(float32 [size, size, 3] RGB in [0, 255] or None, None or why it failed) per image, in order.

    The files among `images` are decoded on tf.data's threads, `batch_size`
    at a time, while the caller consumes the results; a file that cannot be
    read or decoded gives (None, the reason). A PIL image or an array that
    cannot be used raises RetrainError naming its index.
    """
    files = _decoded_files([image for image in images if is_path(image)], size, batch_size)
    for index, image in enumerate(images):
        yield next(files) if is_path(image) else (in_memory(image, size, index), None)


def _decoded_files(paths: list, size: int, batch_size: int):
    """(pixels or None, reason or None) of each file, in order (nothing built until asked)."""
    from retrain.data import pixel_batches

    outcomes: dict = {}
    batches = pixel_batches.image_batches(paths, size, batch_size, outcomes=outcomes)
    for indices, pixels, ok in batches:
        for index, one, decoded in zip(indices.numpy(), pixels.numpy(), ok.numpy()):
            reason = outcomes.pop(int(index)).reason
            yield (one, None) if decoded else (None, reason)


def in_memory(image: Any, size: int, index: int = 0) -> np.ndarray:
    """float32 [size, size, 3] of a PIL image or an RGB array in [0, 255]; RetrainError naming
    `index` (the image's place in the list) when it is neither, or out of shape or range."""
    if _is_pil(image):
        return _resized(_pil_rgb(image), size)
    if not isinstance(image, np.ndarray):
        raise RetrainError(
            f"images[{index}] must be a file path, a PIL image or an array [height, width, 3]. "
            f"Received: {type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise RetrainError(
            f"images[{index}] must be an RGB array [height, width, 3]. Received: shape "
            f"{image.shape}"
        )
    if image.dtype == np.uint8:
        return _resized(image, size)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise RetrainError(
            f"images[{index}] must hold numbers in [0, 255]. Received: dtype {image.dtype}"
        )
    low, high = (np.min(image), np.max(image)) if np.isfinite(image).all() else (np.nan, np.nan)
    if not 0 <= low <= high <= 255:
        raise RetrainError(
            f"images[{index}] must hold RGB values in [0, 255] (not [0, 1]: multiply by 255). "
            f"Received: values from {low} to {high}"
        )
    return _resized(image.astype(np.float32), size)


def _resized(pixels: np.ndarray, size: int) -> np.ndarray:
    from retrain.data import resizing

    return resizing.resize_to_input(pixels, size)


def _pil_rgb(image) -> np.ndarray:
    """uint8 [h, w, 3] of a PIL image, converted to RGB as `decode.decode_rgb` converts a file."""
    from PIL import ImageOps

    from retrain.data import decode

    # exif_transpose returns a copy (the caller's image stays as it is).
    upright = ImageOps.exif_transpose(image)
    # decode's own conversion (alpha on white, 16-bit scaled), so a picture
    # gives the pixels its file gives; it has no public name yet.
    return decode.rgb_pixels(upright)


def _is_pil(image: Any) -> bool:
    from PIL import Image

    return isinstance(image, Image.Image)
