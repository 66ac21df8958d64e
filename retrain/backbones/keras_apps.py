"""Keras-application backbones (InceptionV3, ResNet50, MobileNetV2).

Weights come from Keras's own download (checked against the hash Keras pins,
where it pins one) or from a file the user names, for machines without
network access. Each model wraps the application with its preprocessing as a
built-in `Rescaling` layer, so it takes RGB pixels in [0, 255] and a saved
model that embeds it loads with plain Keras.
"""

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import keras
import numpy as np
from keras import layers

from retrain.errors import RetrainError

_RELEASES = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """One of Keras's released weights files."""

    url: str
    md5: str | None  # the hash Keras pins for it; None where Keras pins none

    @property
    def name(self):
        return self.url.rsplit("/", 1)[1]


@dataclasses.dataclass(frozen=True)
class KerasApp:
    """How to build one application and normalise its input.

    The model computes `pixels * scale + offset` (offset per RGB channel or
    one number). `bgr_conv` names the first convolution of networks trained
    on BGR input: its input channels are reversed once after loading, which
    is exactly equivalent to reversing the pixels' channels.
    """

    constructor: str
    top: WeightsFile
    notop: WeightsFile
    scale: float
    offset: float | list[float]
    bgr_conv: str | None = None


APPS = {
    "inception_v3": KerasApp(
        "InceptionV3",
        WeightsFile(
            _RELEASES + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
            "9a0d58056eeedaa3f26cb7ebd46da564",
        ),
        WeightsFile(
            _RELEASES + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "bcbd6486424b2319ff4ef7d526e38f63",
        ),
        scale=1 / 127.5,
        offset=-1.0,
    ),
    "resnet50": KerasApp(
        "ResNet50",
        WeightsFile(
            _RELEASES + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels.h5",
            "2cb95161c43110f7111970584f804107",
        ),
        WeightsFile(
            _RELEASES + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "4d473c1dd8becc155b73f8504c6f6626",
        ),
        # Caffe-style: ImageNet channel means (given here in RGB order).
        scale=1.0,
        offset=[-123.68, -116.779, -103.939],
        bgr_conv="conv1_conv",
    ),
    "mobilenet_v2": KerasApp(
        "MobileNetV2",
        WeightsFile(
            _RELEASES + "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5",
            None,
        ),
        WeightsFile(
            _RELEASES
            + "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
            None,
        ),
        scale=1 / 127.5,
        offset=-1.0,
    ),
}


def weights_id(weights_file):
    """How the registry names a released file: "md5:<hex>", else "keras-file:<name>"."""
    if weights_file.md5:
        return f"md5:{weights_file.md5}"
    return f"keras-file:{weights_file.name}"


def load(spec, include_top=False, weights_file=None):
    """Build the application `spec.name` with ImageNet or the user's weights.

    Args:
        spec: the `BackboneSpec`.
        include_top: keep the 1000-class layer (as logits) instead of
            global average pooling.
        weights_file: path of a weights file to use instead of Keras's
            download: Keras's released `.h5` file or a `.weights.h5` saved
            from the same application (with or without top, as requested).

    Returns:
        keras.Model from float32 [batch, size, size, 3] RGB in [0, 255] to
        float32 [batch, spec.feature_dim] or [batch, 1000] logits.
    """
    app = APPS[spec.name]
    released = app.top if include_top else app.notop
    if weights_file is None:
        path = _download(spec.name, released)
    else:
        path = Path(weights_file)
        if not path.is_file():
            raise RetrainError(
                f"The weights file {path} does not exist. "
                f"{_how_to_get(spec.name, released)} Received: weights_file={weights_file}"
            )
    size = spec.input_size
    base = getattr(keras.applications, app.constructor)(
        include_top=include_top,
        weights=None,
        input_shape=(size, size, 3),
        pooling=None if include_top else "avg",
        classifier_activation=None,
    )
    try:
        base.load_weights(path)
    except Exception as error:  # Keras raises many types for a wrong file
        raise RetrainError(
            f"Cannot load {spec.name} weights (include_top={include_top}) from "
            f"{path}: {error}. {_how_to_get(spec.name, released)}"
        ) from None
    if app.bgr_conv:
        kernel = base.get_layer(app.bgr_conv).kernel
        kernel.assign(np.flip(keras.ops.convert_to_numpy(kernel), axis=2))
    inputs = keras.Input((size, size, 3), name="pixels")
    x = layers.Rescaling(app.scale, offset=app.offset, name="normalize")(inputs)
    return keras.Model(inputs, base(x), name=spec.name)


def _download(name, released):
    """Keras's cached copy of `released`, downloading it if needed."""
    try:
        # get_file prints its progress on stdout, which carries results only.
        with contextlib.redirect_stdout(sys.stderr):
            return Path(
                keras.utils.get_file(
                    released.name,
                    released.url,
                    cache_subdir="models",
                    file_hash=released.md5,
                    # Read per call, so KERAS_HOME set after importing Keras counts.
                    cache_dir=os.environ.get("KERAS_HOME"),
                )
            )
    except Exception as error:  # offline, refused, or a hash mismatch
        raise RetrainError(
            f"Cannot download the ImageNet weights of {name} ({error}). "
            f"{_how_to_get(name, released)}"
        ) from None


def _how_to_get(name, released):
    return (
        f"Get {released.name} from {released.url} on a machine with network "
        "access and pass it with --backbone_weights FILE (in Python: "
        f"retrain.backbones.load({name!r}, weights_file=FILE))."
    )
