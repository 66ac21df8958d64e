"""The fine-tuning recipe: layer-wise rates, AdamW's decay, the schedule, label smoothing, best epoch."""

import numpy as np
import pytest

from retrain.quiet_tensorflow import import_tensorflow
from retrain.training import learning_rates
from retrain.training.losses import SmoothedSparseCrossentropy

tf = import_tensorflow()
import keras  # noqa: E402


def blocky_backbone():
    """A small functional model named like EfficientNet: stem, block1a, block2a, block2b, top."""
    pixels = keras.Input((8, 8, 3), name="pixels")
    x = keras.layers.Conv2D(4, 3, name="stem_conv")(pixels)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Conv2D(4, 1, name="block1a_project_conv")(x)
    x = keras.layers.Conv2D(4, 1, name="block2a_expand_conv")(x)
    x = keras.layers.Conv2D(4, 1, name="block2b_expand_conv")(x)
    x = keras.layers.Conv2D(6, 1, name="top_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(pixels, x, name="blocky")


def test_depths_count_blocks_from_the_output():
    depths = learning_rates.block_depths(blocky_backbone())
    assert depths == {
        "stem_conv": 3,
        "stem_bn": 3,
        "block1a_project_conv": 2,
        "block2a_expand_conv": 1,
        "block2b_expand_conv": 1,
        "top_conv": 0,
    }


def test_the_rates_of_efficientnet_lite0_shrink_per_block_as_the_docs_say():
    from retrain import backbones

    backbone = backbones.load("efficientnet_lite0", include_top=False)
    scales = learning_rates.rate_scales(backbone, 0.7)
    assert scales["top_conv/kernel"] == 1.0
    assert scales["block7a_project_conv/kernel"] == pytest.approx(0.7)
    assert scales["block6d_dwconv/kernel"] == pytest.approx(0.7**2)
    assert scales["block1a_dwconv/kernel"] == pytest.approx(0.7**7)
    assert scales["stem_conv/kernel"] == pytest.approx(0.7**8)
    # Every weight of the backbone has a share.
    assert set(scales) == {variable.path for variable in backbone.weights}


def test_a_backbone_without_block_names_falls_back_to_equal_groups():
    pixels = keras.Input((4,))
    x = pixels
    for index in range(16):
        x = keras.layers.Dense(4, name=f"layer{index}")(x)
    depths = learning_rates.block_depths(keras.Model(pixels, x))
    assert depths["layer0"] == learning_rates.FALLBACK_GROUPS - 1
    assert depths["layer15"] == 0
    assert sorted(set(depths.values())) == list(range(learning_rates.FALLBACK_GROUPS))


def one_step(backbone, gradient_value, weight_decay, rate=0.01, decay=0.5):
    """Weights before and after one LayerwiseAdamW step with every gradient = gradient_value."""
    variables = backbone.trainable_variables
    optimizer = learning_rates.LayerwiseAdamW(
        rate, learning_rates.rate_scales(backbone, decay), weight_decay=weight_decay
    )
    before = {v.path: np.array(v.numpy()) for v in variables}
    optimizer.apply([tf.fill(v.shape, gradient_value) for v in variables], variables)
    return before, {v.path: np.array(v.numpy()) for v in variables}


def test_each_variable_moves_by_its_share_of_the_rate():
    backbone = blocky_backbone()
    before, after = one_step(backbone, 1.0, weight_decay=0.0)
    # Adam's first step moves every weight by the rate (m / sqrt(v) = 1) times its share.
    for path, depth in [("stem_conv/kernel", 3), ("block2a_expand_conv/kernel", 1)]:
        np.testing.assert_allclose(before[path] - after[path], 0.01 * 0.5**depth, rtol=1e-3)
    np.testing.assert_allclose(before["top_conv/bias"] - after["top_conv/bias"], 0.01, rtol=1e-3)


def test_weight_decay_is_decoupled_scaled_and_spares_biases_and_batchnorm():
    backbone = blocky_backbone()
    for variable in backbone.trainable_variables:
        variable.assign(tf.ones(variable.shape))
    before, after = one_step(backbone, 0.0, weight_decay=0.1)
    # A zero gradient leaves Adam's update at zero: only the decay moves kernels.
    np.testing.assert_allclose(after["stem_conv/kernel"], 1 - 0.01 * 0.5**3 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(after["top_conv/kernel"], 1 - 0.01 * 0.1, rtol=1e-6)
    for path in ("top_conv/bias", "stem_bn/gamma", "stem_bn/beta"):
        np.testing.assert_array_equal(after[path], before[path])


def test_the_schedule_warms_up_linearly_then_decays_to_zero():
    schedule = learning_rates.warmup_cosine(1e-3, total_steps=100, warmup_steps=10)
    rates = [float(schedule(step)) for step in (0, 5, 10, 55, 100)]
    assert rates[0] == pytest.approx(0.0, abs=1e-9)
    assert rates[1] == pytest.approx(5e-4, rel=1e-3)
    assert rates[2] == pytest.approx(1e-3, rel=1e-3)
    assert rates[3] == pytest.approx(5e-4, rel=1e-2)
    assert rates[4] == pytest.approx(0.0, abs=1e-9)
    no_warmup = learning_rates.warmup_cosine(1e-3, total_steps=100, warmup_steps=0)
    assert float(no_warmup(0)) == pytest.approx(1e-3)


def test_label_smoothing_spreads_the_target_over_all_classes():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    labels = np.array([0, 2])
    smoothing = 0.3
    target = np.full((2, 3), smoothing / 3) + (1 - smoothing) * np.eye(3)[labels]
    expected = -(target * np.log(probabilities)).sum(axis=1).mean()
    loss = SmoothedSparseCrossentropy(smoothing)(labels, probabilities)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy()(labels, probabilities)
    assert float(SmoothedSparseCrossentropy(0.0)(labels, probabilities)) == pytest.approx(
        float(plain), rel=1e-5
    )


class WeightsAtEachEpoch(keras.callbacks.Callback):
    """Records the model's weights and val_loss after every epoch (an after_checkpoint callback)."""

    def __init__(self):
        super().__init__()
        self.weights, self.losses = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([np.array(w) for w in self.model.get_weights()])
        self.losses.append(logs["val_loss"])


def test_the_weights_kept_are_those_of_the_epoch_with_the_lowest_validation_loss(tmp_path):
    from retrain.training.callbacks import PixelValidationScores
    from retrain.training.checkpoints import Checkpoint
    from retrain.training.fine_tune import fine_tune
    from retrain.training.settings import FineTuneSettings

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (64, 8, 8, 3)).astype(np.float32)
    # Training says class 0, validation class 1: the further training goes, the
    # worse validation gets, so the best epoch is the first, not the last.
    zeros = np.zeros(len(pixels), np.int64)
    training = tf.data.Dataset.from_tensor_slices((pixels, zeros)).repeat().batch(16)
    validation = PixelValidationScores(
        tf.data.Dataset.from_tensor_slices((pixels, zeros + 1)).batch(16)
    )
    backbone = blocky_backbone()
    head = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2, activation="softmax")])
    recorder = WeightsAtEachEpoch()
    settings = FineTuneSettings(
        layers=-1, epochs=4, learning_rate=0.05, batch_size=16, warmup_epochs=0, progress=False
    )
    result = fine_tune(
        backbone,
        head,
        training,
        validation,
        settings,
        input_size=8,
        steps_per_epoch=4,
        checkpoint=Checkpoint(tmp_path / "checkpoint", "fingerprint"),
        after_checkpoint=[recorder],
    )
    best = int(np.argmin(recorder.losses))
    assert best < len(recorder.losses) - 1, recorder.losses  # the case that can tell
    assert result.best_epoch == best + 1
    assert result.images_per_second > 0 and result.forward_images_per_second > 0
    kept = backbone.get_weights() + head.get_weights()
    expected = recorder.weights[best]
    assert len(kept) == len(expected)
    for now, then in zip(kept, expected):
        np.testing.assert_array_equal(now, then)
