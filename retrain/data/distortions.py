"""Random distortions of training images, with retrain.py's flags and meanings.

    flip_left_right     mirror half of the images
    random_crop P       crop a square of the input side out of the image
                        enlarged by P percent (a margin of P percent to move in)
    random_scale P      enlarge by a further random factor in [1, 1 + P/100]
    random_brightness P multiply the pixels by a random factor in
                        [1 - P/100, 1 + P/100]
    random_resized_crop P
                        cut a random rectangle keeping P to 100 percent of the
                        area, of aspect 3:4 to 4:3, and resize it back to the
                        input side (the "Inception" crop of ImageNet training,
                        milder: P is 8 there, where epochs are many)

Each image draws its own distortion, anew every epoch. The function returned
by `distortion_function` is what `decode.image_batches(distort=...)` runs on
every training image after resizing, so distortions change only training
batches: validation, test and the bottleneck cache always see plain pixels.
"""

from __future__ import annotations

from retrain.quiet_tensorflow import import_tensorflow


def distortion_function(
    input_size: int,
    *,
    flip_left_right: bool = False,
    random_crop: float = 0.0,
    random_scale: float = 0.0,
    random_brightness: float = 0.0,
    random_resized_crop: float = 0.0,
):
    """A per-image random distortion, or None when every setting is off.

    Args:
      input_size: the backbone's square input side.
      flip_left_right, random_crop, random_scale, random_brightness,
        random_resized_crop: as in the module docstring; percentages are >= 0,
        random_brightness and random_resized_crop <= 100 (`config.validate`
        checks them).

    Returns:
      None, or a function float32 [input_size, input_size, 3] RGB in [0, 255]
      -> float32 [input_size, input_size, 3] RGB in [0, 255], made of
      TensorFlow random ops (so it runs inside tf.data and draws anew on every
      call).
    """
    if not (
        flip_left_right or random_crop or random_scale or random_brightness or random_resized_crop
    ):
        return None
    tf = import_tensorflow()
    margin = 1.0 + random_crop / 100.0
    most_enlarged = 1.0 + random_scale / 100.0

    def distort(pixels):
        if random_resized_crop:
            pixels = _resized_crop(tf, pixels, input_size, random_resized_crop / 100.0)
        if random_crop or random_scale:
            # retrain.py's recipe: enlarge by margin * U(1, 1 + scale), then
            # cut an input-sized square at a random place.
            factor = margin
            if random_scale:
                factor *= tf.random.uniform([], 1.0, most_enlarged)
            side = tf.cast(tf.math.round(input_size * factor), tf.int32)
            pixels = tf.image.resize(pixels, tf.stack([side, side]), method="bilinear")
            pixels = tf.image.random_crop(pixels, [input_size, input_size, 3])
        if flip_left_right:
            pixels = tf.image.random_flip_left_right(pixels)
        if random_brightness:
            factor = tf.random.uniform(
                [], 1.0 - random_brightness / 100.0, 1.0 + random_brightness / 100.0
            )
            pixels = tf.clip_by_value(pixels * factor, 0.0, 255.0)
        return pixels

    return distort


def _resized_crop(tf, pixels, input_size: int, smallest_area: float):
    """A random rectangle of `pixels` ([s, s, 3]) covering `smallest_area` to all of it, resized to s."""
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(pixels),
        bounding_boxes=tf.zeros([1, 0, 4]),
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(smallest_area, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(pixels, begin, size)
    return tf.image.resize(crop, [input_size, input_size], method="bilinear")
