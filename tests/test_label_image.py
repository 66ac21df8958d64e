"""python -m retrain.label_image with a small model trained here on real photos."""

import json
import os
import subprocess
import sys

import pytest

from retrain import label_image


@pytest.fixture(scope="module")
def model(photo_model):
    return photo_model


def run(model, *arguments, capsys):
    status = label_image.main(["--graph", model["graph"], "--labels", model["labels"], *arguments])
    out, err = capsys.readouterr()
    return status, out, err


def parse_text(out):
    """{path: [(label, score), ...]} from the text output (unknown and summary lines left out)."""
    result, current = {}, None
    for line in out.splitlines():
        if line.startswith("  unknown (") or " images: " in line:
            continue
        if line.startswith("  "):
            label, score = line.split()
            result[current].append((label, float(score.strip("()"))))
        else:
            current = line
            result[current] = []
    return result


def test_a_training_image_gets_its_class_first(model, capsys):
    names = model["names"]
    chosen = [str(model["photos"] / name / "1.png") for name in names]
    status, out, err = run(model, "--image", *chosen, capsys=capsys)
    assert (status, err) == (0, "")
    result = parse_text(out)
    assert list(result) == chosen
    assert out.splitlines()[-1] == "3 images: 3 labelled, 0 unknown, 0 unreadable"
    for name, path in zip(names, chosen):
        predictions = result[path]
        assert predictions[0][0] == name, predictions
        assert len(predictions) == len(names)  # top 5 capped at the number of classes
        scores = [score for _, score in predictions]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-3)


def test_json_output_and_top_k(model, capsys):
    path = str(model["photos"] / "coffee" / "2.png")
    status, out, _ = run(model, "--image", path, "--json", "--top_k", "2", capsys=capsys)
    assert status == 0
    document = json.loads(out)
    assert document["errors"] == []
    [result] = document["results"]
    assert result["image"] == path
    assert [p["label"] for p in result["predictions"]][0] == "coffee"
    assert len(result["predictions"]) == 2
    assert result["predictions"][0]["score"] >= result["predictions"][1]["score"]
    # One image, no detector beside the model: no summary, no unknown fields.
    assert set(document) == {"graph", "results", "errors"} and set(result) == {
        "image",
        "predictions",
    }


def test_a_folder_is_searched_for_images(model, capsys):
    (model["photos"] / "cat" / "notes.txt").write_text("not an image")
    status, out, err = run(model, "--image", str(model["photos"]), capsys=capsys)
    assert (status, err) == (0, "")
    result = parse_text(out)
    assert len(result) == len(model["names"]) * model["variants"]
    correct = sum(
        predictions[0][0] == os.path.basename(os.path.dirname(path))
        for path, predictions in result.items()
    )
    assert correct == len(result)


def test_a_corrupt_image_is_reported_and_the_others_labelled(model, capsys):
    broken = model["root"] / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    good = [str(model["photos"] / "cat" / "3.png"), str(model["photos"] / "rocket" / "3.png")]
    status, out, err = run(model, "--image", good[0], str(broken), good[1], capsys=capsys)
    assert status == 1
    assert list(parse_text(out)) == good
    assert out.splitlines()[-1] == "3 images: 2 labelled, 0 unknown, 1 unreadable"
    assert len(err.splitlines()) == 1 and str(broken) in err and "Traceback" not in err
    status, out, err = run(model, "--image", str(broken), "--json", capsys=capsys)
    assert status == 1
    assert json.loads(out)["errors"][0]["image"] == str(broken)


def test_missing_image_paths_are_reported(model, capsys):
    status, out, err = run(model, "--image", str(model["root"] / "nope.jpg"), capsys=capsys)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and "nope.jpg: no such file or folder" in err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["--labels", "labels.txt", "--image", "x.jpg"],
            "the following arguments are required: --graph",
        ),
        (
            ["--graph", "m.keras", "--labels", "l.txt", "--image", "x.jpg", "--top_k", "0"],
            "--top_k",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(arguments, message, capsys):
    with pytest.raises(SystemExit) as raised:
        label_image.main(arguments)
    err = capsys.readouterr().err
    assert raised.value.code == 2
    assert len(err.splitlines()) == 1 and message in err


def test_unusable_model_or_labels_exit_2_with_one_line(model, tmp_path, capsys):
    image = str(model["photos"] / "cat" / "0.png")
    missing = str(tmp_path / "missing.keras")
    status = label_image.main(["--graph", missing, "--labels", model["labels"], "--image", image])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and missing in err

    two_labels = tmp_path / "labels.txt"
    two_labels.write_text("cat\ncoffee\n", encoding="utf-8")
    status = label_image.main(
        ["--graph", model["graph"], "--labels", str(two_labels), "--image", image]
    )
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and "3 outputs but" in err


def test_command_line_prints_only_results(model):
    """The real command: stdout has the labels, stderr stays clean (no TensorFlow noise)."""
    path = str(model["photos"] / "rocket" / "4.png")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "retrain.label_image",
            "--graph",
            model["graph"],
            "--labels",
            model["labels"],
            "--image",
            path,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    # The model has no unknown detector beside it: labelled, with one warning naming it.
    assert result.returncode == 0
    assert result.stderr.startswith("WARNING: ") and len(result.stderr.splitlines()) == 1
    assert model["graph"] in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.splitlines()[0] == path
    assert result.stdout.splitlines()[1].split()[0] == "rocket"
