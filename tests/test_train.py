"""Training the softmax head on bottleneck vectors (synthetic vectors: no backbone needed)."""

import logging

import numpy as np
import pytest

from retrain.errors import RetrainError
from retrain.quiet_tensorflow import import_tensorflow
from retrain.training import predict
from retrain.training.callbacks import ValidationScores
from retrain.training.class_weights import balanced_class_weights
from retrain.training.head import build_head, train_head
from retrain.training.settings import HeadSettings

tf = import_tensorflow()
import keras  # noqa: E402

FEATURES = 32
CLASSES = 4
# The command line's defaults, with a smaller step budget.
FAST = dict(
    how_many_training_steps=300,
    learning_rate=0.003,
    train_batch_size=100,
    validation_batch_size=-1,
    eval_step_interval=10,
    seed=0,
    progress=False,
)


def settings(**changes):
    return {**FAST, **changes}


def clusters(n, seed, spread=1.0):
    """float32 [n, FEATURES] vectors around one centre per class, labels int64 [n].

    With spread 1 a logistic regression separates them perfectly.
    """
    centres = np.random.default_rng(0).normal(0, 1, (CLASSES, FEATURES))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    vectors = centres[labels] + rng.normal(0, spread, (n, FEATURES))
    return vectors.astype(np.float32), labels


def accuracy(head, x, y):
    return float((head.predict(x, verbose=0).argmax(axis=1) == y).mean())


def learned_well(head, x, y):
    """The check the tests rely on; test_random_labels_fail_the_check shows it can fail."""
    return accuracy(head, x, y) >= 0.9


def test_separable_vectors_are_learned():
    (tx, ty), (vx, vy), (sx, sy) = clusters(400, 1), clusters(100, 2), clusters(200, 3)
    result = train_head(tx, ty, vx, vy, CLASSES, HeadSettings(**FAST))
    assert learned_well(result.head, sx, sy)
    probabilities = result.head.predict(sx, verbose=0)
    assert probabilities.shape == (200, CLASSES) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_random_labels_fail_the_check():
    (tx, _), (vx, _), (sx, _) = clusters(400, 1), clusters(100, 2), clusters(200, 3)
    rng = np.random.default_rng(7)
    ty, vy, sy = (rng.integers(0, CLASSES, n) for n in (400, 100, 200))
    result = train_head(tx, ty, vx, vy, CLASSES, HeadSettings(**FAST))
    assert not learned_well(result.head, sx, sy)
    assert accuracy(result.head, sx, sy) < 0.45  # chance is 0.25


def test_early_stopping_keeps_the_best_weights():
    # Random training labels: the validation loss can only get worse as the
    # head memorises them, so training must stop early and roll back.
    (tx, _), (vx, vy) = clusters(200, 1), clusters(100, 2)
    ty = np.random.default_rng(3).integers(0, CLASSES, 200)
    result = train_head(
        tx,
        ty,
        vx,
        vy,
        CLASSES,
        HeadSettings(**settings(how_many_training_steps=4000, learning_rate=0.05)),
    )
    steps = [entry["step"] for entry in result.history]
    assert result.stopped_early and steps[-1] < 4000
    assert result.best_step < steps[-1]
    best = result.history[steps.index(result.best_step)]
    assert best["val_loss"] == min(entry["val_loss"] for entry in result.history)
    loss, val_accuracy = result.head.evaluate(vx, vy, verbose=0)
    assert loss == pytest.approx(best["val_loss"], rel=1e-5)
    assert val_accuracy == pytest.approx(best["val_accuracy"])


def test_same_seed_same_head_other_seed_other_head():
    (tx, ty), (vx, vy) = clusters(200, 1), clusters(50, 2)
    weights = [
        train_head(tx, ty, vx, vy, CLASSES, HeadSettings(**settings(seed=seed))).head.get_weights()[
            0
        ]
        for seed in (5, 5, 6)
    ]
    np.testing.assert_array_equal(weights[0], weights[1])
    assert not np.allclose(weights[0], weights[2])


def test_empty_validation_set_trains_the_whole_budget(caplog):
    (tx, ty), (sx, sy) = clusters(300, 1), clusters(200, 3)
    empty_x, empty_y = np.zeros((0, FEATURES), np.float32), np.zeros(0, np.int64)
    with caplog.at_level(logging.WARNING, logger="retrain.training.head"):
        result = train_head(tx, ty, empty_x, empty_y, CLASSES, HeadSettings(**FAST))
    assert "validation set is empty" in caplog.text
    assert not result.stopped_early
    assert result.best_step == result.history[-1]["step"] == 300
    assert all(entry["val_loss"] is None for entry in result.history)
    assert learned_well(result.head, sx, sy)


def test_steps_are_whole_evaluation_intervals():
    (tx, ty), (vx, vy) = clusters(100, 1), clusters(40, 2)
    result = train_head(
        tx, ty, vx, vy, CLASSES, HeadSettings(**settings(how_many_training_steps=25))
    )
    assert [entry["step"] for entry in result.history] == [10, 20, 30]
    short = train_head(tx, ty, vx, vy, CLASSES, HeadSettings(**settings(how_many_training_steps=3)))
    assert [entry["step"] for entry in short.history] == [3]


def test_validation_sample_and_summaries(tmp_path):
    (tx, ty), (vx, vy) = clusters(100, 1), clusters(60, 2)
    for steps in (50, 30):  # the second run's logs replace the first's
        train_head(
            tx,
            ty,
            vx,
            vy,
            CLASSES,
            HeadSettings(
                summaries_dir=str(tmp_path),
                **settings(validation_batch_size=20, how_many_training_steps=steps),
            ),
        )
    for folder in ("train", "validation"):
        events = [
            event
            for path in (tmp_path / folder).iterdir()
            for event in tf.compat.v1.train.summary_iterator(str(path))
        ]
        scalars = {(value.tag, event.step) for event in events for value in event.summary.value}
        tags = {"train": ("loss", "accuracy", "learning_rate"), "validation": ("loss", "accuracy")}[
            folder
        ]
        assert scalars == {(tag, step) for tag in tags for step in (10, 20, 30)}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(train_y=np.full(50, CLASSES)), "class indices in"),
        (dict(train_y=np.zeros(49, np.int64)), "train_x must be"),
        (
            dict(val_x=np.zeros((10, FEATURES + 1), np.float32), val_y=np.zeros(10, np.int64)),
            "as many features",
        ),
        (
            dict(train_x=np.zeros((0, FEATURES), np.float32), train_y=np.zeros(0, np.int64)),
            "No bottlenecks to train on",
        ),
        (dict(train_x=np.full((50, FEATURES), np.nan, np.float32)), "NaN"),
        (dict(how_many_training_steps=0), "how_many_training_steps=0"),
        (dict(learning_rate=-1.0), "learning_rate=-1.0"),
        (dict(validation_batch_size=0), "validation_batch_size=0"),
    ],
)
def test_bad_input_is_named(change, message):
    (tx, ty), (vx, vy) = clusters(50, 1), clusters(10, 2)
    arguments = dict(train_x=tx, train_y=ty, val_x=vx, val_y=vy, num_classes=CLASSES, **FAST)
    arguments.update(change)
    with pytest.raises(RetrainError, match=message):
        settings_fields = {name: arguments.pop(name) for name in FAST}
        train_head(**arguments, settings=HeadSettings(**settings_fields))


def test_balanced_class_weights_are_inverse_frequencies():
    weights = balanced_class_weights(np.array([0] * 6 + [1] * 3 + [2] * 1), 4)
    # n / (k * n_c) = 10 / (4 * n_c); class 3 has no image.
    np.testing.assert_allclose(weights, [10 / 24, 10 / 12, 10 / 4, 0.0])


def test_balanced_weights_raise_recall_of_a_rare_class():
    """A class with 1/20 of the images, overlapping the others: weighting finds more of it."""
    rng = np.random.default_rng(5)
    centres = np.array([[0.0, 0.0], [1.2, 0.0]])

    def imbalanced(n):
        labels = (rng.random(n) < 0.05).astype(np.int64)
        return (centres[labels] + rng.normal(0, 0.7, (n, 2))).astype(np.float32), labels

    (tx, ty), (vx, vy), (sx, sy) = imbalanced(2000), imbalanced(400), imbalanced(4000)
    rare = sy == 1
    recalls = {}
    for name, weights in (("none", None), ("balanced", balanced_class_weights(ty, 2))):
        head = train_head(tx, ty, vx, vy, 2, HeadSettings(**settings(class_weights=weights))).head
        recalls[name] = float((head.predict(sx[rare], verbose=0).argmax(axis=1) == 1).mean())
    assert recalls["balanced"] > recalls["none"] + 0.2, recalls


@pytest.mark.parametrize(
    "weights", [np.ones(3), np.array([1.0, -1.0, 1.0, 1.0]), np.array([1, np.nan, 1, 1])]
)
def test_bad_class_weights_are_named(weights):
    (tx, ty), (vx, vy) = clusters(50, 1), clusters(20, 2)
    with pytest.raises(RetrainError, match="class_weights must be 4 finite weights"):
        train_head(tx, ty, vx, vy, CLASSES, HeadSettings(**settings(class_weights=weights)))


def test_validation_scores_equal_keras_evaluate():
    """The in-memory validation callback reports what Keras's own validation pass would,
    L2 term included, at the weights of each evaluation."""
    (tx, ty), (vx, vy) = clusters(300, 1, spread=3.0), clusters(120, 2, spread=3.0)
    head = build_head(FEATURES, CLASSES, l2=0.05)
    head.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    scores = ValidationScores(vx, vy)
    seen = []

    class Compare(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            expected = head.evaluate(vx, vy, verbose=0, return_dict=True)
            seen.append(
                (logs["val_loss"], expected["loss"], logs["val_accuracy"], expected["accuracy"])
            )

    head.fit(tx, ty, epochs=3, batch_size=50, verbose=0, callbacks=[scores, Compare()])
    assert len(seen) == 3 and seen[0][0] != seen[-1][0]
    for loss, expected_loss, hits, expected_hits in seen:
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        assert hits == pytest.approx(expected_hits, abs=1e-6)
    assert 0.2 < seen[-1][2] < 1.0  # overlapping clusters: not trivially 0 or 1


def test_predict_is_the_heads_probabilities_in_any_batch_size():
    head = build_head(16, 3)
    vectors = np.random.default_rng(0).normal(size=(23, 16)).astype(np.float32)
    expected = head.predict(vectors, verbose=0)
    for batch_size in (-1, 1, 7, 23, 100):
        found = predict.predict(head, vectors, batch_size)
        assert found.shape == (23, 3)
        np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-7)
    assert predict.predict(head, vectors[:0], -1).shape == (0, 3)
