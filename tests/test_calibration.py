"""Temperature scaling (retrain.evaluation.calibration) and its place in the exported model.

The fitted temperature is the minimum of the validation negative
log-likelihood (checked against a brute-force grid); calibration never
changes a prediction; the expected calibration error is the textbook sum;
and the exported classifier's probabilities are the calibrated ones.
"""

import numpy as np
import pytest

from retrain.evaluation import calibration


def overconfident_views(rng, n=400, k=5, views=1, sharpness=4.0):
    """[views, n, k] softmax probabilities of noisy logits made `sharpness` times too sure,
    and labels drawn from the true (unsharpened) probabilities."""
    logits = rng.normal(0, 1.5, (n, k))
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in true])
    noisy = logits[None] + rng.normal(0, 0.3, (views, n, k))
    sharp = np.exp(sharpness * noisy)
    return (sharp / sharp.sum(-1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("views", [1, 2])
def test_temperature_is_the_grid_minimum_of_the_nll(views):
    probabilities, labels = overconfident_views(np.random.default_rng(views), views=views)
    found = calibration.fit_temperature(probabilities, labels)
    logits = calibration.mean_logits(probabilities)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 20001))
    losses = [calibration.objective(logits, labels, t) for t in grid]
    best = grid[int(np.argmin(losses))]
    # The grid's step is 0.03% of T: the two agree to a few steps.
    assert found == pytest.approx(best, rel=2e-3)
    # Made 4x too sure: the fitted temperature undoes most of it.
    assert 2.5 < found < 5.5
    assert calibration.negative_log_likelihood(
        logits, labels, found
    ) < calibration.negative_log_likelihood(logits, labels, 1.0)


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0, 2.7, 20.0])
def test_calibration_never_changes_the_argmax(views, temperature):
    probabilities, _ = overconfident_views(np.random.default_rng(7), views=views)
    uncalibrated = calibration.calibrate(probabilities)
    calibrated = calibration.calibrate(probabilities, temperature)
    np.testing.assert_array_equal(calibrated.argmax(1), uncalibrated.argmax(1))
    np.testing.assert_allclose(calibrated.sum(1), 1.0, atol=1e-5)
    if temperature < 0.3:
        return  # sharper still: the smallest probabilities underflow float32
    # And it is invertible: 1 / T gives the uncalibrated probabilities back.
    np.testing.assert_allclose(
        calibration.calibrate(calibrated, 1 / temperature), uncalibrated, atol=2e-5
    )


def test_calibration_lowers_the_error_on_held_out_rows():
    rng = np.random.default_rng(3)
    # 3,000 rows: the error's sampling noise (about 0.02 at 400) stays small.
    validation, validation_labels = overconfident_views(rng, n=3000)
    test, test_labels = overconfident_views(rng, n=3000)
    temperature = calibration.fit_temperature(validation, validation_labels)
    before = calibration.expected_calibration_error(calibration.calibrate(test), test_labels)
    after = calibration.expected_calibration_error(
        calibration.calibrate(test, temperature), test_labels
    )
    assert after < before / 2 and after < 0.05


def test_expected_calibration_error_by_hand():
    probabilities = np.array([[0.95, 0.05], [0.9, 0.1], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    # Bins of width 1/15: {0.95}, {0.9}, {0.7}, {0.55}; correct 1, 0, 1, 0.
    expected = (abs(1 - 0.95) + abs(0 - 0.9) + abs(1 - 0.7) + abs(0 - 0.55)) / 4
    assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    table = calibration.reliability_bins(probabilities, labels)
    assert table["count"].sum() == 4 and len(table["edges"]) == 16
    # A confidence of exactly 1.0 falls in the last bin, not past it.
    assert calibration.reliability_bins(np.array([[1.0, 0.0]]), np.array([0]))["count"][-1] == 1


def test_an_all_correct_validation_set_does_not_drive_the_temperature_to_its_bound():
    probabilities, _ = overconfident_views(np.random.default_rng(5), n=35)
    right = probabilities[0].argmax(1)
    # Without the prior the NLL of an all-correct set falls all the way to the bound.
    logits = calibration.mean_logits(probabilities)
    assert calibration.negative_log_likelihood(
        logits, right, calibration.MIN_TEMPERATURE
    ) < calibration.negative_log_likelihood(logits, right, 0.3)
    assert 0.3 < calibration.fit_temperature(probabilities, right) < 1.0


def test_nothing_to_fit_keeps_the_probabilities():
    assert calibration.fit_temperature(np.zeros((1, 0, 3), np.float32), np.zeros(0, int)) == 1.0
    assert calibration.expected_calibration_error(np.zeros((0, 3)), np.zeros(0, int)) == 0.0


def test_the_exported_model_returns_calibrated_probabilities(photo_model):
    from retrain import export

    classifier = export.load_classifier(photo_model["graph"])
    logits = classifier.get_layer("logits")
    backbone = next(
        layer for layer in classifier.layers if layer.name not in ("logits",) and layer.weights
    )
    import keras

    head = keras.Sequential(
        [keras.Input((logits.kernel.shape[0],)), keras.layers.Dense(logits.units, "softmax")]
    )
    head.layers[-1].set_weights(logits.get_weights())
    temperature = 2.5
    calibrated = export.build_classifier(backbone, head, 224, temperature=temperature)
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 240, 260, 3)).astype(np.float32)
    plain = classifier.predict_on_batch(pixels)
    np.testing.assert_allclose(
        calibrated.predict_on_batch(pixels),
        calibration.calibrate(plain, temperature),
        atol=1e-5,
    )
