"""The learning rates of fine-tuning: warm-up then cosine decay, shrinking per block toward the input.

`block_depths` numbers the backbone's weighted layers by how far their block
sits from the output (0: the head and the layers after the last block, 1: the
last block, ... the stem deepest); `rate_scales` turns that into each
variable's share of the peak rate, `layer_decay ** depth` (the layer-wise
decay of BEiT and ELECTRA fine-tuning: the generic features near the input
move least). `LayerwiseAdamW` applies those shares, with AdamW's decoupled
weight decay scaled the same way, and `warmup_cosine` is the schedule of the
peak rate: a linear rise from 0, then a cosine to 0.
"""

from __future__ import annotations

import re

from retrain.quiet_tensorflow import import_tensorflow

import_tensorflow()
import keras  # noqa: E402  (after TensorFlow, whose start-up noise is dropped above)

# Blocks of the Keras-style backbones: EfficientNet(-Lite) "block3b_...",
# MobileNetV2 "block_13_...". A backbone without such names is split into
# FALLBACK_GROUPS runs of equal length instead.
_BLOCK = re.compile(r"^block_?(\d+)")
FALLBACK_GROUPS = 8
# Variables that weight decay leaves alone: biases and BatchNorm's scale and
# offset (decaying them only shifts activations; AdamW papers exclude them).
_NOT_DECAYED = re.compile(r"(bias|gamma|beta)$")


def block_depths(backbone: keras.Model) -> dict[str, int]:
    """Layer name -> depth from the output, for every backbone layer that holds weights.

    Layers after the last block (EfficientNet's top_conv) are depth 0, like the
    head; block N of B is depth B - N + 1; layers before the first block (the
    stem) are one deeper than the first block.
    """
    weighted = [layer.name for layer in backbone.layers if layer.weights]
    blocks = [_block_number(name) for name in weighted]
    if not any(number is not None for number in blocks):
        size = -(-len(weighted) // FALLBACK_GROUPS)
        return {
            name: FALLBACK_GROUPS - 1 - position // size for position, name in enumerate(weighted)
        }
    last = max(number for number in blocks if number is not None)
    depths, seen_block = {}, False
    for name, number in zip(weighted, blocks):
        seen_block = seen_block or number is not None
        if number is not None:
            depths[name] = last - number + 1
        else:
            depths[name] = last + 1 if not seen_block else 0
    return depths


def _block_number(name: str) -> int | None:
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


def rate_scales(backbone: keras.Model, layer_decay: float) -> dict[str, float]:
    """Variable path -> its share of the peak rate, layer_decay ** depth (1 for the head)."""
    depths = block_depths(backbone)
    return {
        variable.path: layer_decay ** depths[layer.name]
        for layer in backbone.layers
        if layer.name in depths
        for variable in layer.weights
    }


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int):
    """The rate schedule: 0 -> `peak` linearly over warmup_steps, then a cosine to 0 at total_steps."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if not warmup_steps:
        return keras.optimizers.schedules.CosineDecay(peak, total_steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0,
        total_steps - warmup_steps,
        warmup_target=peak,
        warmup_steps=warmup_steps,
    )


class LayerwiseAdamW(keras.optimizers.Adam):
    """Adam whose rate, and decoupled weight decay, each variable takes a share of.

    scales: variable path -> share of the rate (1 for variables not listed,
      such as the head's). weight_decay: AdamW's decoupled decay, applied
      before each update as variable -= rate * share * weight_decay *
      variable, to kernels only (not biases, nor BatchNorm's gamma and beta).
    """

    def __init__(self, learning_rate, scales: dict[str, float], weight_decay: float = 0.0):
        super().__init__(learning_rate)
        self._scales_by_path = dict(scales)
        self._decay = float(weight_decay)
        self._shares = []
        self._decayed = []

    def build(self, variables):
        super().build(variables)
        self._shares = [self._scales_by_path.get(variable.path, 1.0) for variable in variables]
        self._decayed = [
            bool(self._decay) and not _NOT_DECAYED.search(variable.path) for variable in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        rate = keras.ops.cast(learning_rate, variable.dtype) * self._shares[index]
        if self._decayed[index]:
            variable.assign_sub(variable * (rate * self._decay))
        super().update_step(gradient, variable, rate)
