"""The run record: what a run saves for its report, read back exactly; unreadable records named."""

import json

import numpy as np
import pytest

from retrain.errors import RetrainError
from retrain.evaluation import run_record


def small_record():
    splits = ["training", "training", "validation", "testing", "testing"]
    return run_record.RunRecord(
        image_dir="/photos",
        class_names=["cat", "dog"],
        settings={"seed": 3, "architecture": "x"},
        images=["cat/1.jpg", "dog/2.jpg", "cat/3.jpg", "dog/4.jpg", "cat/é 5.jpg"],
        labels=np.array([0, 1, 0, 1, 0]),
        splits=splits,
        history=[
            {
                "step": 10,
                "loss": 0.5,
                "accuracy": 0.8,
                "val_loss": None,
                "val_accuracy": None,
                "learning_rate": 0.003,
            }
        ],
        best_step=10,
        stopped_early=True,
        class_weights=[1.25, 0.83],
        probabilities={
            "validation": np.array([[0.9, 0.1]], np.float32),
            "testing": np.array([[0.2, 0.8], [0.4, 0.6]], np.float32),
        },
        skipped=[("dog/bad.jpg", "damaged JPEG file")],
    )


def test_round_trip(tmp_path):
    record = small_record()
    run_record.save(record, tmp_path)
    loaded = run_record.load(tmp_path)
    for name in (
        "image_dir",
        "class_names",
        "settings",
        "images",
        "splits",
        "history",
        "best_step",
        "stopped_early",
        "class_weights",
        "skipped",
    ):
        assert getattr(loaded, name) == getattr(record, name), name
    np.testing.assert_array_equal(loaded.labels, record.labels)
    for split in ("validation", "testing"):
        np.testing.assert_array_equal(loaded.probabilities[split], record.probabilities[split])
    assert loaded.rows("testing").tolist() == [3, 4]
    assert loaded.counts().tolist() == [[1, 1, 1], [1, 0, 1]]


def test_probabilities_must_match_the_split(tmp_path):
    record = small_record()
    record.probabilities["testing"] = np.zeros((3, 2), np.float32)
    with pytest.raises(RetrainError, match=r"probabilities\['testing'\].*shape=\(3, 2\)"):
        run_record.save(record, tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda out: (out / "run_record.json").write_text("{not json"),
            "Cannot read .*run_record.json",
        ),
        (lambda out: (out / "run_record.json").write_text(json.dumps({"images": []})), "KeyError"),
        (lambda out: (out / "probabilities.npz").unlink(), "no probabilities.npz"),
        (
            lambda out: (out / "probabilities.npz").write_bytes(b"garbage"),
            "Cannot read .*probabilities.npz",
        ),
    ],
)
def test_a_damaged_record_is_named(tmp_path, damage, message):
    run_record.save(small_record(), tmp_path)
    damage(tmp_path)
    with pytest.raises(RetrainError, match=message):
        run_record.load(tmp_path)
