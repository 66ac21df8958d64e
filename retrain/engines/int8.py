"""The full-integer (int8) LiteRT backbone: its fixed calibration set, conversion and check.

`--engine litert-int8` runs the backbone with int8 weights and activations
(float32 input and output, a quantize op at each end), about 1.6x the float
LiteRT rate on CPUs with VNNI. Quantization needs the activations' ranges,
measured on calibration images. They are never the user's photos: every
machine, shard and Beam worker must make the same vectors, so the set is
fixed and versioned:

- the source: scikit-image's bundled photos (installed with the
  dependencies; colour ones as they are, grey ones repeated to RGB);
- the recipe: CALIBRATION_IMAGES crops at seeded positions (PCG64, seed
  CALIBRATION_SEED), 35-100% of the photo's area, half of them mirrored,
  resized with Pillow's integer bilinear filter to the input side (uint8);
- the version: CALIBRATION_VERSION, in the converted file's name and in the
  cache identity (`identity_name`), and the SHA-256 of the uint8 pixels,
  checked against CALIBRATION_DIGEST before a conversion: when a new
  scikit-image or Pillow makes other pixels, the engine is refused (the run
  falls back to float LiteRT with a warning) instead of silently making
  other vectors.

A new conversion is checked against the Keras vectors on real photos
(`check`): the median cosine similarity to Keras's must reach
MIN_MEDIAN_COSINE and every one MIN_COSINE.
"""

from __future__ import annotations

import hashlib

import numpy as np

ENGINE = "litert-int8"
CALIBRATION_VERSION = 1
CALIBRATION_SEED = 20261206
CALIBRATION_IMAGES = 128
# SHA-256 of the calibration pixels at 224 x 224 (EfficientNet-Lite0's side),
# made by scikit-image 0.26 and Pillow 11-12 (see `calibration_pixels`).
CALIBRATION_DIGEST = {224: "33a29daab1c8adc04fde27566f4ae0cf638325e52d9e656248c180c01176d193"}
# Colour photos first, then grey ones (repeated to RGB): scikit-image's own files.
COLOUR_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "stereo_motorcycle",
)
GREY_PHOTOS = ("camera", "coins", "grass", "gravel", "brick", "moon", "clock")
# What a conversion must show on the check photos (`check`: the run's first
# photos and scikit-image's): the median cosine similarity of its vectors to
# Keras's, and the smallest. A good conversion of Lite0 with this calibration
# set, every photo of a set (benchmarks/int8_accuracy.py): Caltech-101 train
# median 0.992, smallest 0.923; flowers128 (4,317 photos of 128 px) 0.970 and
# 0.588; flowers 32x32 0.967 and 0.601. The floors sit below those, so a
# good conversion is never refused for a set's odd photo, and far above what
# a wrong one gives (another network with the same shapes: about 0).
MIN_MEDIAN_COSINE = 0.9
MIN_COSINE = 0.5


class CalibrationChanged(Exception):
    """The calibration recipe made other pixels than the version it claims."""


def identity_name() -> str:
    """The engine's name in the cache identity: the calibration version makes other vectors."""
    return f"{ENGINE}c{CALIBRATION_VERSION}"


def source_photos() -> list[np.ndarray]:
    """uint8 [h, w, 3] arrays of scikit-image's bundled photos, in a fixed order."""
    from skimage import data

    photos = []
    for name in COLOUR_PHOTOS:
        pixels = getattr(data, name)()
        photos.append(np.asarray(pixels[0] if isinstance(pixels, tuple) else pixels)[..., :3])
    for name in GREY_PHOTOS:
        grey = np.asarray(getattr(data, name)(), np.uint8)
        photos.append(np.repeat(grey[..., None], 3, axis=-1))
    return photos


def calibration_pixels(input_size: int) -> np.ndarray:
    """float32 [CALIBRATION_IMAGES, input_size, input_size, 3] in [0, 255]: the fixed set.

    Raises CalibrationChanged when the pixels' digest is not CALIBRATION_DIGEST's
    for this side (a side without a recorded digest is made as it comes).
    """
    from PIL import Image

    rng = np.random.Generator(np.random.PCG64(CALIBRATION_SEED))
    photos = source_photos()
    crops = np.empty((CALIBRATION_IMAGES, input_size, input_size, 3), np.uint8)
    for index in range(CALIBRATION_IMAGES):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        # A square-ish crop of 35-100% of the area, at an integer position.
        share = rng.uniform(0.35, 1.0)
        side_h = max(1, int(round(height * np.sqrt(share))))
        side_w = max(1, int(round(width * np.sqrt(share))))
        top = int(rng.integers(0, height - side_h + 1))
        left = int(rng.integers(0, width - side_w + 1))
        crop = Image.fromarray(
            np.ascontiguousarray(photo[top : top + side_h, left : left + side_w])
        )
        crop = crop.resize((input_size, input_size), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops[index] = np.asarray(crop)
    digest = hashlib.sha256(crops.tobytes()).hexdigest()
    expected = CALIBRATION_DIGEST.get(input_size)
    if expected is not None and digest != expected:
        raise CalibrationChanged(
            f"the int8 calibration set (version {CALIBRATION_VERSION}) came out different "
            f"here (SHA-256 {digest[:16]}..., expected {expected[:16]}...): another "
            "scikit-image or Pillow made other pixels, and int8 vectors would not match "
            "other machines'"
        )
    return crops.astype(np.float32)


def convert(model, input_size: int, batch_size: int) -> bytes:
    """The full-integer .tflite (bytes) of a Keras backbone at a fixed batch size.

    float32 [batch_size, size, size, 3] in [0, 255] -> float32 [batch_size,
    feature_dim]; weights and activations int8, calibrated on
    `calibration_pixels`.
    """
    import keras

    from retrain.engines import litert

    pixels = keras.Input((input_size, input_size, 3), batch_size=batch_size)
    fixed = keras.Model(pixels, model(pixels, training=False))
    return litert.convert(fixed, "int8", calibration_pixels(input_size))


def cosines(reference: np.ndarray, found: np.ndarray) -> np.ndarray:
    """float64 [n]: the cosine similarity of each row of found to the same row of reference."""
    reference = np.asarray(reference, np.float64)
    found = np.asarray(found, np.float64)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(found, axis=1)
    return (reference * found).sum(axis=1) / np.maximum(norms, 1e-12)


def check(reference: np.ndarray, found: np.ndarray) -> tuple[dict, str | None]:
    """(measured figures, None or why the conversion fails) for int8 vectors `found` of the
    photos whose Keras vectors are `reference` (float32 [n, d] each)."""
    similarity = cosines(reference, found)
    median, smallest = float(np.median(similarity)), float(similarity.min())
    measured = {
        "median_cosine": median,
        "min_cosine": smallest,
        "floors": [MIN_MEDIAN_COSINE, MIN_COSINE],
        "calibration_version": CALIBRATION_VERSION,
    }
    if median >= MIN_MEDIAN_COSINE and smallest >= MIN_COSINE:
        return measured, None
    return measured, (
        f"cosine similarity to the Keras vectors median {median:.3f}, smallest {smallest:.3f} "
        f"on {len(similarity)} photos (needs {MIN_MEDIAN_COSINE} and {MIN_COSINE})"
    )
