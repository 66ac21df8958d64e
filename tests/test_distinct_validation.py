"""Model selection on validation images with no near-copy in training (issue 23).

Vectors are built with known cosine distances to their nearest training
vector, so the tests know exactly which images must count as distinct.
"""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from retrain.data.images import ImageEntry
from retrain.evaluation import distinct_validation, run_record
from retrain.evaluation.distinct_validation import (
    MIN_DISTINCT_IMAGES,
    DistinctValidation,
    nearest_training_distances,
)
from retrain.evaluation.distinct_validation import (
    distinct_validation as find_distinct,
)
from retrain.evaluation.near_duplicates import DUPLICATE_DISTANCE
from retrain.quiet_tensorflow import import_tensorflow
from retrain.report import page
from retrain.training import classifier, datasets
from retrain.training.callbacks import PixelValidationScores, ValidationScores
from retrain.training.fine_tune import FineTuneResult
from retrain.training.fit import FitLoop, fit
from retrain.training.head import TrainResult, build_head, fit_head
from retrain.training.settings import HeadSettings

tf = import_tensorflow()
import keras  # noqa: E402

DIM = 64
CLASSES = 3


def planted(distances, training=8, seed=0):
    """(training float32 [training, DIM], validation float32 [len(distances), DIM]).

    Training vectors are orthonormal (times random lengths); validation
    vector i lies at exactly cosine distance distances[i] from training
    vector i % training, in a direction orthogonal to every training vector,
    so that one is its nearest.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    train_unit, spare = basis[:, :training].T, basis[:, training:].T
    validation = []
    for i, distance in enumerate(distances):
        cos = 1.0 - distance
        away = spare[i % len(spare)]
        validation.append(cos * train_unit[i % training] + np.sqrt(1 - cos**2) * away)
    lengths = rng.uniform(0.5, 3.0, (training, 1))
    scale = rng.uniform(0.5, 3.0, (len(distances), 1))
    return (train_unit * lengths).astype(np.float32), (np.array(validation) * scale).astype(
        np.float32
    )


def test_nearest_distances_are_exact_in_any_blocks_and_chunks():
    distances = np.tile([0.05, 0.15, 0.0, 0.3, 0.099, 0.101], 5)
    training, validation = planted(distances)
    whole = nearest_training_distances(validation, [training])
    np.testing.assert_allclose(whole, distances, atol=2e-6)
    blocked = nearest_training_distances(
        validation, (training[i : i + 3] for i in range(0, len(training), 3)), chunk=7
    )
    np.testing.assert_allclose(blocked, whole, atol=1e-6)
    assert blocked.dtype == np.float32 and blocked.shape == (len(distances),)


def test_exactly_the_images_within_the_distance_are_ignored():
    """Validation vectors at 0.05 from a training vector are left out, those at 0.15 kept,
    and the distinct scores are the scores of exactly the far subset."""
    distances = np.array([0.05, 0.15] * 60)
    training, validation = planted(distances)
    result = find_distinct(validation, [training])
    np.testing.assert_array_equal(result.mask, distances > DUPLICATE_DISTANCE)
    assert result.distinct == 60 and result.count == 120 and result.used
    assert result.summary() == (
        "validation: 120 images, 60 farther than 0.1 from every training image; "
        "model selection uses those"
    )

    labels = np.random.default_rng(1).integers(0, CLASSES, len(validation))
    head = build_head(DIM, CLASSES, l2=0.01)
    head.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    scores = ValidationScores(validation, labels, result)
    logs = {}
    scores.set_model(head)
    scores.on_train_begin()
    scores.on_epoch_end(0, logs)
    far = head.evaluate(validation[result.mask], labels[result.mask], verbose=0, return_dict=True)
    near = head.evaluate(
        validation[~result.mask], labels[~result.mask], verbose=0, return_dict=True
    )
    every = head.evaluate(validation, labels, verbose=0, return_dict=True)
    assert logs["distinct_val_loss"] == pytest.approx(far["loss"], rel=1e-5)
    assert logs["distinct_val_accuracy"] == pytest.approx(far["accuracy"], abs=1e-6)
    assert logs["val_loss"] == pytest.approx(every["loss"], rel=1e-5)
    assert logs["selection_loss"] == logs["distinct_val_loss"] != pytest.approx(near["loss"])
    assert logs["selection_distinct"] == 1.0


@pytest.mark.parametrize(
    "distinct, total, used",
    [
        (MIN_DISTINCT_IMAGES - 1, 200, False),  # too few images
        (60, 400, False),  # 15%: too small a share
        (MIN_DISTINCT_IMAGES, 250, True),  # 50 and 20%: just enough
    ],
)
def test_used_only_with_enough_distinct_images(distinct, total, used):
    distances = np.array([0.15] * distinct + [0.02] * (total - distinct))
    training, validation = planted(distances)
    result = find_distinct(validation, [training])
    assert result.distinct == distinct and result.used is used
    labels = np.zeros(total, np.int64)
    head = build_head(DIM, CLASSES)
    head.compile(loss="sparse_categorical_crossentropy")
    logs = {}
    scores = ValidationScores(validation, labels, result)
    scores.set_model(head)
    scores.on_train_begin()
    scores.on_epoch_end(0, logs)
    assert logs["selection_loss"] == logs["distinct_val_loss" if used else "val_loss"]
    assert ("model selection uses those" in result.summary()) is used


def test_no_mask_keeps_the_plain_figures_and_selects_on_them():
    training, validation = planted([0.2] * 10)
    head = build_head(DIM, CLASSES)
    head.compile(loss="sparse_categorical_crossentropy")
    logs = {}
    scores = ValidationScores(validation, np.zeros(10, np.int64))
    scores.set_model(head)
    scores.on_train_begin()
    scores.on_epoch_end(0, logs)
    assert "distinct_val_loss" not in logs and logs["selection_loss"] == logs["val_loss"]


def disagreeing_split(seed=0):
    """Training clusters; validation = 400 near-copies of training images (right labels)
    plus 100 distinct ones: noise with random labels.

    Fitting the clusters lowers the loss on the near-copies all along, and
    raises it on the distinct images from the first evaluation on.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (CLASSES, DIM)) * 3
    train_y = rng.integers(0, CLASSES, 600)
    train_x = (centres[train_y] + rng.normal(0, 1, (600, DIM))).astype(np.float32)
    copies = rng.choice(600, 400, replace=False)
    near_x = train_x[copies] + rng.normal(0, 0.05, (400, DIM))
    far_x, far_y = rng.normal(0, 1, (100, DIM)), rng.integers(0, CLASSES, 100)
    val_x = np.concatenate([near_x, far_x]).astype(np.float32)
    val_y = np.concatenate([train_y[copies], far_y]).astype(np.int64)
    return train_x, train_y, val_x, val_y


def test_early_stopping_follows_the_distinct_images_when_they_disagree():
    train_x, train_y, val_x, val_y = disagreeing_split()
    distinct = find_distinct(val_x, [train_x])
    np.testing.assert_array_equal(distinct.mask, np.arange(500) >= 400)
    assert distinct.used
    settings = HeadSettings(
        how_many_training_steps=400,
        learning_rate=0.003,
        train_batch_size=100,
        eval_step_interval=10,
        seed=0,
        progress=False,
    )
    shape = dict(feature_dim=DIM, num_classes=CLASSES, train_count=600)
    training = datasets.array_training(train_x, train_y, 100, 0)
    plain = fit_head(training, (val_x, val_y), settings, **shape)
    selected = fit_head(training, (val_x, val_y, distinct), settings, **shape)

    def argmin_step(history, key):
        return min(history, key=lambda entry: entry[key])["step"]

    assert selected.best_step == argmin_step(selected.history, "distinct_val_loss")
    assert plain.best_step == argmin_step(plain.history, "val_loss")
    # The two disagree: the near-copies keep improving after the distinct images turn.
    assert selected.best_step < plain.best_step
    assert all(entry["selection"] == "distinct" for entry in selected.history)
    assert all(entry["selection"] == "all" for entry in plain.history)


def write_images(folder, count, size=24):
    """count PNG files of solid colours with noise; (entries, labels int64 [count])."""
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 200, 40], [40, 40, 230]])
    entries = []
    for i in range(count):
        label = i % CLASSES
        pixels = np.clip(colours[label] + rng.normal(0, 40, (size, size, 3)), 0, 255)
        path = folder / f"c{label}" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        entries.append(ImageEntry(f"c{label}/{i}.png", f"c{label}", label, "validation", str(i)))
    return entries


def pixel_model(size):
    images = keras.Input((size, size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(images))
    outputs = keras.layers.Dense(
        CLASSES, activation="softmax", kernel_regularizer=keras.regularizers.L2(0.01)
    )(pooled)
    model = keras.Model(images, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def test_pixel_validation_scores_decoded_images_plain_and_distinct(tmp_path):
    size = 16
    entries = write_images(tmp_path, 21)
    labels = np.array([entry.label_index for entry in entries])
    # Every third image is "distinct": the mask need not follow any pattern of the data.
    mask = np.arange(21) % 3 == 1
    distinct = DistinctValidation(np.where(mask, 0.5, 0.01).astype(np.float32), mask)
    dataset = datasets.decoded_evaluation(tmp_path, entries, size, batch_size=4)
    pixels = np.concatenate([batch for batch, _ in dataset])
    model = pixel_model(size)
    seen = []

    class Compare(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            far = model.evaluate(pixels[mask], labels[mask], verbose=0, return_dict=True)
            every = model.evaluate(pixels, labels, verbose=0, return_dict=True)
            seen.append((dict(logs), far, every))

    scores = PixelValidationScores(dataset, distinct)
    model.fit(pixels, labels, epochs=3, batch_size=7, verbose=0, callbacks=[scores, Compare()])
    assert len(seen) == 3 and seen[0][0]["val_loss"] != seen[-1][0]["val_loss"]
    for logs, far, every in seen:
        assert logs["distinct_val_loss"] == pytest.approx(far["loss"], rel=1e-5)
        assert logs["distinct_val_accuracy"] == pytest.approx(far["accuracy"], abs=1e-6)
        assert logs["val_loss"] == pytest.approx(every["loss"], rel=1e-5)
        assert logs["val_accuracy"] == pytest.approx(every["accuracy"], abs=1e-6)
        # 7 distinct of 21: too few to select on.
        assert logs["selection_loss"] == logs["val_loss"] and logs["selection_distinct"] == 0.0


def entry(step, plain, distinct, selection):
    return {
        "step": step,
        "val_accuracy": plain,
        "distinct_val_accuracy": distinct,
        "selection": selection,
    }


@pytest.mark.parametrize(
    "selection, warned, named",
    [
        # All images say fine-tuning lost 0.02, the distinct ones that it gained.
        ("distinct", False, None),
        ("all", True, "on the validation images, below"),
    ],
)
def test_the_worse_warning_compares_what_model_selection_used(caplog, selection, warned, named):
    head = TrainResult(
        None, [entry(10, 0.96, 0.70, selection), entry(20, 0.95, 0.6, selection)], 10
    )
    tuned = FineTuneResult(
        [entry(1, 0.90, 0.80, selection), entry(2, 0.94, 0.78, selection)], best_epoch=2
    )
    with caplog.at_level(logging.WARNING):
        classifier._warn_if_worse(head, tuned)
    assert bool(caplog.records) is warned
    if named:
        assert named in caplog.text and "0.940" in caplog.text and "0.960" in caplog.text


def test_the_worse_warning_names_the_distinct_images(caplog):
    head = TrainResult(None, [entry(10, 0.90, 0.80, "distinct")], 10)
    tuned = FineTuneResult([entry(1, 0.95, 0.75, "distinct")], best_epoch=1)
    with caplog.at_level(logging.WARNING):
        classifier._warn_if_worse(head, tuned)
    assert "0.750 on the validation images with no near-copy in training" in caplog.text


def recorded_run(tmp_path, distances, right, distinct_record=True):
    """A saved run: 4 training and len(distances) validation images, validation
    image i predicted right when right[i]. Returns the output folder."""
    n = len(distances)
    truth = np.arange(n) % 2
    predicted = np.where(right, truth, 1 - truth)
    probabilities = np.where(predicted[:, None] == [0, 1], 0.9, 0.1).astype(np.float32)
    distinct = DistinctValidation(np.asarray(distances, np.float32), np.asarray(distances) > 0.1)
    record = run_record.RunRecord(
        image_dir="/photos",
        class_names=["cat", "dog"],
        settings={"seed": 0},
        images=[f"i{i}.jpg" for i in range(4 + n)],
        labels=np.concatenate([[0, 1, 0, 1], truth]),
        splits=["training"] * 4 + ["validation"] * n,
        probabilities={"validation": probabilities},
        distinct_validation=distinct.record() if distinct_record else None,
    )
    run_record.save(record, tmp_path)
    return tmp_path


def test_the_record_keeps_the_distances_and_the_page_shows_both_figures(tmp_path):
    # Rows 0-3 within the distance (all right), 4-11 beyond it (half right).
    distances = [0.02, 0.05, 0.08, 0.1] + [0.2] * 8
    right = [True] * 4 + [True, False] * 4
    folder = recorded_run(tmp_path, distances, right)
    loaded = run_record.load(folder)
    np.testing.assert_array_equal(loaded.distinct_mask(), np.arange(12) >= 4)
    shown = page.distinct_accuracy(loaded)
    assert shown["accuracy"] == pytest.approx(0.5) and shown["plain"] == pytest.approx(8 / 12)
    html = page.build(folder).read_text()
    assert "50.0%</b><span>validation accuracy on the 8 with no near-copy in training" in html
    assert "66.7%</b> on all 12 validation images, <b>50.0%</b> on the 8 whose nearest" in html
    assert "The split is optimistic" in html


def test_no_optimism_sentence_when_the_figures_agree(tmp_path):
    distances = [0.02, 0.05, 0.08, 0.1] + [0.2] * 8
    folder = recorded_run(tmp_path, distances, [True] * 12)
    html = page.build(folder).read_text()
    assert "100.0%</b> on the 8 whose nearest" in html
    assert "The split is optimistic" not in html


def test_a_record_from_before_distinct_validation_still_loads_and_renders(tmp_path):
    folder = recorded_run(tmp_path, [0.2] * 6, [True] * 6, distinct_record=False)
    document = json.loads((folder / "run_record.json").read_text())
    del document["distinct_validation"]
    (folder / "run_record.json").write_text(json.dumps(document))
    loaded = run_record.load(folder)
    assert loaded.distinct_validation is None and page.distinct_accuracy(loaded) is None
    assert "no near-copy in training" not in page.build(folder).read_text()


def test_a_record_with_the_wrong_number_of_distances_is_refused(tmp_path):
    folder = recorded_run(tmp_path, [0.2] * 6, [True] * 6)
    document = json.loads((folder / "run_record.json").read_text())
    document["distinct_validation"]["distances"].append(0.3)
    (folder / "run_record.json").write_text(json.dumps(document))
    with pytest.raises(Exception, match="one distance per validation image"):
        run_record.load(folder)


def test_the_optimism_sentence_needs_a_gap_of_more_than_three_points():
    assert distinct_validation.optimism(0.95, 0.93) == ""
    assert "5.0 points above" in distinct_validation.optimism(0.95, 0.90)


def test_the_fit_loop_runs_a_validation_callback_first_and_records_its_keys(tmp_path):
    """fit.fit takes PixelValidationScores as `validation`: the history then holds the
    plain, distinct and selection figures of every epoch."""
    size = 16
    entries = write_images(tmp_path, 12)
    labels = np.array([entry.label_index for entry in entries])
    mask = np.arange(12) < 6
    distinct = DistinctValidation(np.where(mask, 0.5, 0.01).astype(np.float32), mask)
    dataset = datasets.decoded_evaluation(tmp_path, entries, size, batch_size=5)
    pixels = np.concatenate([batch for batch, _ in dataset])
    model = pixel_model(size)
    training = tf.data.Dataset.from_tensor_slices((pixels, labels)).repeat().batch(4)
    loop = FitLoop(steps_per_epoch=3, epochs=2, batch_size=4, progress=False)
    history, _ = fit(model, training, PixelValidationScores(dataset, distinct), loop)
    assert [entry["step"] for entry in history] == [3, 6]
    for entry in history:
        assert entry["distinct_val_loss"] is not None and entry["val_loss"] is not None
        assert entry["selection"] == "all" and entry["selection_loss"] == entry["val_loss"]
    far = model.evaluate(pixels[mask], labels[mask], verbose=0, return_dict=True)
    assert history[-1]["distinct_val_accuracy"] == pytest.approx(far["accuracy"], abs=1e-6)
