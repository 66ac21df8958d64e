"""Calibration and unknown pictures in metrics.json, the run record and the report page.

The probabilities come from a real model: a logistic regression trained on
scikit-learn's digits (too little regularisation, so it is overconfident,
as a trained head can be), calibrated with retrain.evaluation.calibration;
the unknown detector (retrain.evaluation.unknown) is fitted on the digits'
pixel vectors. The images are the digits written as PNG files.
"""

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from sklearn import datasets, linear_model
from test_figures import assert_png

from retrain.errors import RetrainError
from retrain.evaluation import calibration, confidence_metrics, metrics, run_record, unknown
from retrain.report import checks, confidence, page, run_report, thumbnails

CLASSES = ["one", "seven", "eight", "nine"]
# Digits the logistic regression confuses now and then (1 and 7, 8 and 9): its
# probabilities then need a temperature (0, 1, 2, 3 are too easy to show one).
DIGITS = [1, 7, 8, 9]


def test_unknown_summary_per_class_on_a_hand_made_array():
    # Threshold 0.5: a score equal to it is not unknown.
    scores = {
        "validation": np.array([0.6, 0.1, 0.7, 0.2, 0.5], np.float32),
        "testing": np.array([0.1, 0.2, 0.9, 0.3, 0.4, 0.8, 0.6, 0.05], np.float32),
    }
    labels = {
        "validation": np.array([0, 1, 2, 2, 1]),
        "testing": np.array([0, 0, 1, 1, 2, 2, 0, 1]),
    }
    predicted = np.array([0, 1, 1, 1, 0, 2, 0, 1])
    probabilities = np.eye(4, dtype=np.float32)[predicted] * 0.7 + 0.075
    detector = {
        "method": confidence_metrics.METHOD,
        "k": 10,
        "threshold": 0.5,
        "acceptance": 0.95,
        "reference_images": 40,
    }
    summary = confidence_metrics.unknown_summary(detector, scores, labels, probabilities, CLASSES)
    assert {key: summary[key] for key in detector} == detector
    assert summary["validation_unknown_share"] == pytest.approx(2 / 5)
    assert summary["test_unknown_share"] == pytest.approx(3 / 8)
    # Kept test images (score <= 0.5): rows 0, 1, 3, 4, 7. Predicted zero: rows 0 (zero) and
    # 4 (two) -> 1/2; one: rows 1 (zero), 3 and 7 (one) -> 2/3; two: only row 5, unknown -> None;
    # three: never predicted -> None.
    assert [row["test_precision"] for row in summary["per_class"]] == pytest.approx(
        [1 / 2, 2 / 3, None, None]
    )
    assert [row["validation_unknown"] for row in summary["per_class"]] == [1, 0, 1, 0]
    assert [row["test_unknown"] for row in summary["per_class"]] == [1, 1, 1, 0]
    assert [row["class"] for row in summary["per_class"]] == CLASSES
    json.dumps(summary)  # JSON-ready as it is

    no_test = confidence_metrics.unknown_summary(
        detector, {"validation": scores["validation"]}, labels, None, CLASSES
    )
    assert no_test["test_unknown_share"] is None
    assert [row["test_unknown"] for row in no_test["per_class"]] == [0, 0, 0, 0]


def test_calibration_summary_on_a_hand_made_array():
    # Every row 0.9 sure, half right: one filled bin, ECE = |0.5 - 0.9|.
    sure = np.array([[0.9, 0.1]] * 4, np.float32)
    labels = np.array([0, 0, 1, 1])
    halved = np.array([[0.5, 0.5]] * 4, np.float32)
    summary = confidence_metrics.calibration_summary(sure, halved, labels, 7.0)
    assert summary == pytest.approx(
        {"temperature": 7.0, "bins": 15, "images": 4, "ece_before": 0.4, "ece_after": 0.0},
        abs=1e-6,
    )
    # Views [v, n, k] are combined at temperature 1.
    views = np.stack([sure, sure])
    assert confidence_metrics.calibration_summary(views, halved, labels, 7.0) == summary


def digits_run():
    """(images, vectors, labels, splits) of 4 digit classes and a model's probabilities.

    Returns a dict with the digits' pixel vectors float32 [n, 64], labels
    int [n], splits, the logistic regression's test/validation probabilities
    and the calibration and unknown figures of a run.
    """
    digits = datasets.load_digits()
    keep = np.isin(digits.target, DIGITS)
    vectors = digits.data[keep].astype(np.float32)
    labels = np.searchsorted(DIGITS, digits.target[keep])
    splits = np.array(["training", "training", "validation", "testing"] * len(labels))[
        : len(labels)
    ]
    rows = {
        split: np.flatnonzero(splits == split) for split in ("training", "validation", "testing")
    }
    model = linear_model.LogisticRegression(C=1e4, max_iter=3000)
    model.fit(vectors[rows["training"]], labels[rows["training"]])
    raw = {split: model.predict_proba(vectors[rows[split]]) for split in ("validation", "testing")}
    temperature = calibration.fit_temperature(raw["validation"], labels[rows["validation"]])
    calibrated = {split: calibration.calibrate(raw[split], temperature) for split in raw}
    detector = unknown.fit(vectors[rows["training"]], vectors[rows["validation"]], 0.95)
    scores = {split: detector.scores(vectors[rows[split]]) for split in raw}
    return {
        "digits": digits.images[keep],
        "labels": labels,
        "splits": list(splits),
        "rows": rows,
        "raw": raw,
        "calibrated": calibrated,
        "temperature": temperature,
        "detector": detector,
        "scores": scores,
    }


@pytest.fixture(scope="module")
def run():
    return digits_run()


def test_calibration_lowers_the_digits_models_error(run):
    test_labels = run["labels"][run["rows"]["testing"]]
    summary = confidence_metrics.calibration_summary(
        run["raw"]["testing"], run["calibrated"]["testing"], test_labels, run["temperature"]
    )
    assert run["temperature"] > 1.0, "an overconfident model needs T > 1"
    assert summary["ece_after"] < summary["ece_before"]
    assert summary["images"] == len(test_labels)
    lines = confidence_metrics.summary_lines(summary, None)
    assert lines == [
        f"Calibration: temperature {run['temperature']:.2f}, expected calibration error "
        f"{summary['ece_before']:.3f} -> {summary['ece_after']:.3f} (15 bins, "
        f"{len(test_labels)} test images)"
    ]


def test_summary_lines_for_unknown():
    detector = {"method": "m", "k": 10, "threshold": 0.2874, "acceptance": 0.95}
    line = confidence_metrics.summary_lines(None, {**detector, "test_unknown_share": 0.046})
    assert line == [
        "Unknown: threshold 0.287 accepts 95% of validation images; "
        "4.6% of test images called unknown"
    ]
    assert confidence_metrics.summary_lines(None, None) == []


def write_images(run, image_dir) -> list[str]:
    """The digits as 64x64 PNG files under image_dir/<class>/; their relative paths."""
    paths = []
    for index, (pixels, label) in enumerate(zip(run["digits"], run["labels"])):
        relative = f"{CLASSES[label]}/digit_{index:04d}.png"
        (image_dir / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((255 - pixels * 16).clip(0, 255).astype(np.uint8))
        grey.resize((64, 64), Image.NEAREST).convert("RGB").save(image_dir / relative)
        paths.append(relative)
    return paths


def make_record(run, image_dir, with_confidence=True) -> run_record.RunRecord:
    record = run_record.RunRecord(
        image_dir=str(image_dir),
        class_names=CLASSES,
        settings={"architecture": "logistic regression on digits"},
        images=write_images(run, image_dir),
        labels=run["labels"],
        splits=run["splits"],
        probabilities=dict(run["calibrated"]),
    )
    if with_confidence:
        test_labels = run["labels"][run["rows"]["testing"]]
        record.calibration = confidence_metrics.calibration_summary(
            run["raw"]["testing"], run["calibrated"]["testing"], test_labels, run["temperature"]
        )
        record.unknown = confidence_metrics.detector_summary(run["detector"])
        record.unknown_scores = dict(run["scores"])
        record.uncalibrated = {"testing": run["raw"]["testing"].astype(np.float32)}
    return record


def test_record_round_trip_with_and_without_confidence(run, tmp_path):
    record = make_record(run, tmp_path / "images")
    run_record.save(record, tmp_path / "new")
    loaded = run_record.load(tmp_path / "new")
    assert loaded.calibration == record.calibration and loaded.unknown == record.unknown
    for split in ("validation", "testing"):
        np.testing.assert_array_equal(loaded.unknown_scores[split], run["scores"][split])
        np.testing.assert_array_equal(loaded.probabilities[split], run["calibrated"][split])
    np.testing.assert_array_equal(loaded.uncalibrated["testing"], record.uncalibrated["testing"])
    assert "validation" not in loaded.uncalibrated
    # Without them, "before" is recovered from the calibrated probabilities and the temperature.
    loaded.uncalibrated = {}
    np.testing.assert_allclose(confidence.uncalibrated(loaded), run["raw"]["testing"], atol=2e-5)

    old = make_record(run, tmp_path / "images", with_confidence=False)
    run_record.save(old, tmp_path / "old")
    document = json.loads((tmp_path / "old" / "run_record.json").read_text())
    for key in ("calibration", "unknown"):  # a record from before issue 24 has no such keys
        del document[key]
    (tmp_path / "old" / "run_record.json").write_text(json.dumps(document))
    loaded = run_record.load(tmp_path / "old")
    assert loaded.calibration is None and loaded.unknown is None and loaded.unknown_scores == {}
    assert set(loaded.probabilities) == {"validation", "testing"}


def test_a_bad_record_of_confidence_is_refused(run, tmp_path):
    record = make_record(run, tmp_path / "images")
    record.unknown_scores = {"testing": np.zeros(3, np.float32)}
    with pytest.raises(RetrainError, match=r"unknown_scores\['testing'\].*shape=\(3,\)"):
        run_record.save(record, tmp_path / "out")
    record = make_record(run, tmp_path / "images")
    run_record.save(record, tmp_path / "out")
    document = json.loads((tmp_path / "out" / "run_record.json").read_text())
    document["calibration"]["temperature"] = "hot"
    (tmp_path / "out" / "run_record.json").write_text(json.dumps(document))
    with pytest.raises(RetrainError, match="calibration must be null or a dict"):
        run_record.load(tmp_path / "out")
    # Scores whose shape does not match the record are refused before being read.
    run_record.save(record, tmp_path / "out")
    np.savez(
        tmp_path / "out" / "probabilities.npz",
        **run["calibrated"],
        testing_unknown_score=np.zeros(5, np.float32),
    )
    with pytest.raises(RetrainError, match="testing_unknown_score is float32 \\(5,\\)"):
        run_record.load(tmp_path / "out")


def test_metrics_json_holds_calibration_and_unknown(run, tmp_path):
    test_labels = run["labels"][run["rows"]["testing"]]
    evaluation = metrics.evaluate(run["calibrated"]["testing"], test_labels, CLASSES)
    calibrated = confidence_metrics.calibration_summary(
        run["raw"]["testing"], run["calibrated"]["testing"], test_labels, run["temperature"]
    )
    labels = {split: run["labels"][run["rows"][split]] for split in ("validation", "testing")}
    found = confidence_metrics.unknown_summary(
        confidence_metrics.detector_summary(run["detector"]),
        run["scores"],
        labels,
        run["calibrated"]["testing"],
        CLASSES,
    )
    metrics.write_metrics(
        evaluation, tmp_path, confidence={"calibration": calibrated, "unknown": found}
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["calibration"] == pytest.approx(calibrated)
    assert saved["unknown"]["threshold"] == pytest.approx(run["detector"].threshold)
    assert saved["unknown"]["validation_unknown_share"] <= 0.05 + 1e-9
    assert len(saved["unknown"]["per_class"]) == len(CLASSES)
    metrics.write_metrics(evaluation, tmp_path)
    assert {"calibration", "unknown"}.isdisjoint(
        json.loads((tmp_path / "metrics.json").read_text())
    )


class Page(HTMLParser):
    """img srcs and the ids of sections, tables and grids of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.ids, self.in_grid, self.grid_images = [], set(), False, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        if attrs.get("id") == "most-unknown":
            self.in_grid = True
        elif tag == "img":
            self.images.append(attrs["src"])
            if self.in_grid:
                self.grid_images.append(attrs["src"])
        elif tag == "section":
            self.in_grid = False


def read_page(out):
    parser = Page()
    text = (out / page.REPORT_FILE).read_text(encoding="utf-8")
    parser.feed(text)
    return parser, text


def test_the_page_shows_calibration_and_unknown_pictures(run, tmp_path):
    record = make_record(run, tmp_path / "images")
    out = tmp_path / "out"
    run_record.save(record, out)
    outcome = run_report.write_run_report(record, checks.DataChecks([], [], {}), out)
    assert outcome.parts.missing == [] and outcome.page is not None
    parsed, text = read_page(out)
    assert {"calibration", "unknown", "unknown-per-class", "most-unknown"} <= parsed.ids
    assert_png(out / confidence.RELIABILITY_FILE)
    assert confidence.RELIABILITY_FILE in parsed.images
    table = text[
        text.index('id="unknown-per-class"') : text.index(
            "</table>", text.index('id="unknown-per-class"')
        )
    ]
    assert table.count("<tr>") == len(CLASSES) + 1
    assert f"{record.calibration['ece_before']:.3f}" in text
    assert f"{record.calibration['ece_after']:.3f}" in text
    # The 12 highest-scoring test images, highest first, each with a thumbnail on disk.
    scores = run["scores"]["testing"]
    tests = record.entries("testing")
    top = [tests[row].relative_path for row in np.argsort(-scores, kind="stable")[:12]]
    assert len(parsed.grid_images) == confidence.SHOWN_UNKNOWN
    for image, src in zip(top, parsed.grid_images):
        assert src == thumbnails.thumbnail_path(image)
        assert (out / src).is_file()
        with Image.open(out / src) as thumbnail:
            thumbnail.verify()
    grid = text.index('id="most-unknown"')  # a top image may be a misclassified one too
    positions = [text.index(image, grid) for image in top]
    assert positions == sorted(positions)


def test_an_old_record_still_renders(run, tmp_path):
    record = make_record(run, tmp_path / "images", with_confidence=False)
    out = tmp_path / "out"
    run_record.save(record, out)
    outcome = run_report.write_run_report(record, checks.DataChecks([], [], {}), out)
    assert outcome.parts.missing == []
    parsed, text = read_page(out)
    assert not {"calibration", "unknown"} & parsed.ids
    assert "Per-class precision" in text
    assert not (out / confidence.RELIABILITY_FILE).exists()


def test_a_failing_figure_is_a_warning_naming_it(run, tmp_path, monkeypatch, caplog):
    record = make_record(run, tmp_path / "images")
    # The temperature alone is enough: the page computes the errors from the probabilities.
    record.calibration = {"temperature": run["temperature"]}
    out = tmp_path / "out"
    run_record.save(record, out)

    def broken(*args, **kwargs):
        raise MemoryError("no room for the figure")

    monkeypatch.setattr(confidence.figures, "plot_reliability", broken)
    outcome = run_report.write_run_report(record, checks.DataChecks([], [], {}), out)
    assert [name for name, _ in outcome.parts.missing] == [confidence.RELIABILITY_FILE]
    assert "reliability.png not written (MemoryError: no room for the figure)" in caplog.text
    parsed, text = read_page(out)
    assert {"calibration", "unknown-per-class"} <= parsed.ids
    assert "could not be drawn" in text
    test_labels = run["labels"][run["rows"]["testing"]]
    ece_before = calibration.expected_calibration_error(run["raw"]["testing"], test_labels)
    assert f"<b>{ece_before:.3f}</b> before" in text


def test_a_small_temperature_shows_the_stored_uncalibrated_probabilities(run, tmp_path):
    """At T = 0.05 (the search's bound, where a validation set with no mistake sends it) the
    calibrated float32 probabilities saturate: the temperature cannot undo that, so the page
    uses the record's uncalibrated probabilities."""
    record = make_record(run, tmp_path / "images")
    record.probabilities = {
        split: calibration.calibrate(run["raw"][split], 0.05) for split in run["raw"]
    }
    record.calibration = {"temperature": 0.05}
    out = tmp_path / "out"
    run_record.save(record, out)
    test_labels = run["labels"][run["rows"]["testing"]]
    ece_before = calibration.expected_calibration_error(run["raw"]["testing"], test_labels)
    recovered = run_record.load(out)
    recovered.uncalibrated = {}
    wrong = calibration.expected_calibration_error(confidence.uncalibrated(recovered), test_labels)
    assert abs(wrong - ece_before) > 0.005, "recovering from saturated probabilities is lossy"
    page.build(out)
    assert f"<b>{ece_before:.3f}</b> before" in (out / page.REPORT_FILE).read_text(encoding="utf-8")
