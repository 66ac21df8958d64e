"""Evaluation metrics, the stdout summary and the metric files written to the output folder."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from retrain import evaluation as evaluation_lib
from retrain.errors import RetrainError

NAMES = ["cat", "dog", "fish"]
# True classes and predictions chosen so every metric can be worked out by hand:
#   true:      cat cat cat dog dog fish
#   predicted: cat cat dog dog cat cat
LABELS = np.array([0, 0, 0, 1, 1, 2])
PREDICTED = np.array([0, 0, 1, 1, 0, 0])


def one_hot_probabilities(predicted, k=3, confidence=0.8):
    probabilities = np.full((len(predicted), k), (1 - confidence) / (k - 1), np.float32)
    probabilities[np.arange(len(predicted)), predicted] = confidence
    return probabilities


def test_metrics_match_a_hand_count():
    evaluation = evaluation_lib.evaluate(one_hot_probabilities(PREDICTED), LABELS, NAMES)
    assert evaluation.accuracy == pytest.approx(3 / 6)
    np.testing.assert_array_equal(evaluation.confusion, [[2, 1, 0], [1, 1, 0], [1, 0, 0]])
    # cat: 2 of 4 "cat" predictions right; 2 of 3 cats found.
    np.testing.assert_allclose(evaluation.precision, [2 / 4, 1 / 2, 0.0])
    np.testing.assert_allclose(evaluation.recall, [2 / 3, 1 / 2, 0.0])
    np.testing.assert_allclose(evaluation.f1, [2 * (0.5 * 2 / 3) / (0.5 + 2 / 3), 0.5, 0.0])
    np.testing.assert_array_equal(evaluation.support, [3, 2, 1])
    assert evaluation.count == 6


def test_metrics_equal_scikit_learns_on_random_predictions():
    """Computed independently with sklearn.metrics.classification_report on the same arg-maxes."""
    from sklearn.metrics import classification_report, confusion_matrix

    rng = np.random.default_rng(3)
    names = [f"class_{i}" for i in range(7)]
    labels = rng.integers(0, 6, 300)  # class_6 never occurs: its support must be 0
    probabilities = rng.dirichlet(np.ones(7), 300).astype(np.float32)
    probabilities[np.arange(150), labels[:150]] += 1.0  # half of them right
    expected = classification_report(
        labels, probabilities.argmax(1), labels=range(7), output_dict=True, zero_division=0
    )
    evaluation = evaluation_lib.evaluate(probabilities, labels, names)
    assert evaluation.accuracy == pytest.approx(expected["accuracy"])
    for index in range(7):
        row = expected[str(index)]
        assert (
            evaluation.precision[index],
            evaluation.recall[index],
            evaluation.f1[index],
        ) == pytest.approx((row["precision"], row["recall"], row["f1-score"]))
        assert evaluation.support[index] == row["support"]
    np.testing.assert_array_equal(
        evaluation.confusion, confusion_matrix(labels, probabilities.argmax(1), labels=range(7))
    )


def test_a_class_never_seen_or_predicted_scores_zero_without_warnings():
    evaluation = evaluation_lib.evaluate(
        one_hot_probabilities(np.array([0, 1])), np.array([0, 1]), NAMES
    )
    assert evaluation.accuracy == 1.0
    assert evaluation.precision[2] == evaluation.recall[2] == evaluation.support[2] == 0


@pytest.mark.parametrize(
    "probabilities, labels, message",
    [
        (np.zeros((6, 2)), LABELS, r"probabilities must be \[n, 3\]"),
        (np.zeros((5, 3)), LABELS, "labels.shape=\\(6,\\)"),
        (np.zeros((0, 3)), np.zeros(0, int), "Nothing to evaluate"),
        (np.zeros((2, 3)), np.array([0, 3]), r"range=\[0, 3\]"),
    ],
)
def test_bad_input_is_named(probabilities, labels, message):
    with pytest.raises(RetrainError, match=message):
        evaluation_lib.evaluate(probabilities, labels, NAMES)


def test_summary_lists_accuracy_and_every_class():
    text = evaluation_lib.summary(
        evaluation_lib.evaluate(one_hot_probabilities(PREDICTED), LABELS, NAMES)
    )
    lines = text.splitlines()
    assert lines[0] == "Final test accuracy = 50.0% (N=6)"
    assert [line.split()[0] for line in lines[2:]] == NAMES
    assert lines[2].split()[1:] == ["0.500", "0.667", "0.571", "3"]


def test_misclassified_names_path_true_predicted_and_score(capsys):
    entries = [
        SimpleNamespace(relative_path=f"{NAMES[y]}/{i}.jpg", label_index=int(y))
        for i, y in enumerate(LABELS)
    ]
    wrong = evaluation_lib.misclassified(one_hot_probabilities(PREDICTED), entries, NAMES)
    assert wrong == [
        ("cat/2.jpg", "cat", "dog", pytest.approx(0.8)),
        ("dog/4.jpg", "dog", "cat", pytest.approx(0.8)),
        ("fish/5.jpg", "fish", "cat", pytest.approx(0.8)),
    ]
    evaluation_lib.print_misclassified(wrong)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "=== MISCLASSIFIED TEST IMAGES ==="
    assert printed[1].split() == ["cat/2.jpg", "dog", "(0.800,", "true:", "cat)"]


def test_write_metrics_files_read_back(tmp_path):
    evaluation = evaluation_lib.evaluate(one_hot_probabilities(PREDICTED), LABELS, NAMES)
    wrong = [("cat/2.jpg", "cat", "dog", 0.8)]
    paths = evaluation_lib.write_metrics(evaluation, tmp_path / "out", wrong)

    metrics = json.loads(paths["metrics"].read_text(encoding="utf-8"))
    assert metrics["accuracy"] == pytest.approx(0.5) and metrics["count"] == 6
    assert metrics["per_class"]["dog"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert metrics["confusion_matrix"] == evaluation.confusion.tolist()
    assert metrics["misclassified"] == [
        {"path": "cat/2.jpg", "true": "cat", "predicted": "dog", "score": 0.8}
    ]

    with open(paths["confusion_matrix"], newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["true \\ predicted", *NAMES]
    assert rows[1:] == [["cat", "2", "1", "0"], ["dog", "1", "1", "0"], ["fish", "1", "0", "0"]]
