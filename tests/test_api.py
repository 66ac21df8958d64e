"""retrain.train from Python: the command line's settings, results and errors, in-process.

A small real set (scikit-image's chelsea, coffee and rocket, 8 crops each
as 64x64 PNGs) and few steps keep each run to seconds.
"""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import yaml
from PIL import Image
from skimage import data

import retrain
from retrain import cli, console, presets
from retrain.config import Config

PHOTOS = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}
# The same settings through the command line and the API.
SETTINGS = {
    "how_many_training_steps": 20,
    "testing_percentage": 25.0,
    "validation_percentage": 25.0,
    "report": False,
    "seed": 3,
}


def write_photos(root, per_class=8, side=64):
    """root/<class>/<n>.png: random crops of each photo, resized to side x side."""
    rng = np.random.default_rng(0)
    for name, pixels in PHOTOS.items():
        (root / name).mkdir(parents=True)
        height, width, _ = pixels.shape
        for number in range(per_class):
            top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
            crop = pixels[top : top + 3 * height // 4, left : left + 3 * width // 4]
            Image.fromarray(crop).resize((side, side)).save(root / name / f"{number}.png")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    base = tmp_path_factory.mktemp("api")
    return {"images": write_photos(base / "photos"), "cache": base / "cache", "base": base}


def api_run(photos, name, **extra):
    settings = {**SETTINGS, "bottleneck_dir": photos["cache"], **extra}
    return retrain.train(photos["images"], output_dir=photos["base"] / name, **settings)


def cli_argv(photos, output_dir):
    argv = ["--image_dir", str(photos["images"]), "--bottleneck_dir", str(photos["cache"])]
    for key, value in SETTINGS.items():
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    return [*argv, "--output_dir", str(output_dir)]


@pytest.fixture(scope="module")
def first_run(photos):
    return api_run(photos, "api")


def settings_without_output(folder):
    settings = yaml.safe_load((folder / "settings.yaml").read_text())
    assert settings.pop("output_dir") == str(folder)
    return settings


def test_api_and_command_line_give_the_same_settings_and_test_accuracy(photos, first_run, capsys):
    assert cli.main(cli_argv(photos, photos["base"] / "cli")) == 0
    capsys.readouterr()
    cli_dir = photos["base"] / "cli"
    assert settings_without_output(cli_dir) == settings_without_output(first_run.output_dir)
    cli_metrics = json.loads((cli_dir / "metrics.json").read_text())
    assert first_run.test_accuracy == cli_metrics["accuracy"] == first_run.metrics["accuracy"]
    assert first_run.metrics["per_class"].keys() == cli_metrics["per_class"].keys()


def test_run_result_fields(first_run):
    out = first_run.output_dir
    assert first_run.class_names == list(PHOTOS)
    assert first_run.model_path == out / "model.keras" and first_run.labels_path.is_file()
    assert first_run.metrics == json.loads((out / "metrics.json").read_text())
    assert 0 <= first_run.test_accuracy <= 1 and 0 <= first_run.validation_accuracy <= 1
    assert first_run.config.how_many_training_steps == 20 and first_run.exports == {}
    assert "model" not in vars(first_run)  # loaded lazily, on first use
    assert first_run.model.output_shape == (None, len(PHOTOS))
    assert first_run.load().class_names == list(PHOTOS)


def test_a_second_run_in_the_process_gives_identical_results_silently(photos, first_run, capfd):
    again = api_run(photos, "again")
    out, err = capfd.readouterr()
    assert out == ""  # nothing on stdout unless verbose=True
    assert "%|" not in err  # no progress bar: stderr is not a terminal here
    assert again.test_accuracy == first_run.test_accuracy
    assert again.validation_accuracy == first_run.validation_accuracy
    assert again.metrics == first_run.metrics
    weights, first = again.model.get_weights(), first_run.model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(weights, first))


@pytest.mark.parametrize(
    "asked, shown",
    [({}, (False, False)), ({"verbose": True, "progress": True}, (True, True))],
)
def test_verbose_and_progress_reach_the_run(photos, monkeypatch, capfd, asked, shown):
    """What the run sees: results printed only with verbose=True, progress bars with
    progress=True (by default only when stderr is a terminal, which it is not here)."""
    from retrain import run

    def fake_run(config):
        console.result("a result line")
        seen.append(console.progress_bars())

    seen = []
    monkeypatch.setattr(run, "run", fake_run)
    monkeypatch.setattr("retrain.api.training._result", lambda config, outcome: None)
    retrain.train(photos["images"], **asked)
    out = capfd.readouterr().out
    assert (out == "a result line\n", seen[0]) == shown


def test_silencing_the_results_leaves_other_threads_prints_alone(capfd):
    other_started, silenced = threading.Event(), threading.Event()

    def other():
        other_started.set()
        silenced.wait(5)
        print("the notebook's own line")
        console.result("a result of another thread's run")

    thread = threading.Thread(target=other)
    with console.shown(results=False, progress=False):
        thread.start()
        other_started.wait(5)
        silenced.set()
        console.result("silenced")
        thread.join()
        assert not console.progress_bars()
    assert console.progress_bars()
    out = capfd.readouterr().out
    assert out.splitlines() == ["the notebook's own line", "a result of another thread's run"]


def command_line_error(argv, capsys):
    assert cli.main(argv) == 2
    return capsys.readouterr().err.strip().removeprefix("retrain: error: ")


@pytest.mark.parametrize(
    "settings, flags",
    [
        ({"how_many_training_steps": 0}, ["--how_many_training_steps", "0"]),
        ({"learning_rate": -1.0}, ["--learning_rate", "-1"]),
        ({"preset": "slow"}, ["--preset", "slow"]),
        ({"tflite": ["float64"]}, ["--tflite", "float64"]),
    ],
)
def test_a_bad_value_raises_the_command_lines_message(photos, settings, flags, capsys):
    expected = command_line_error(["--image_dir", str(photos["images"]), *flags], capsys)
    with pytest.raises(retrain.RetrainError) as raised:
        retrain.train(photos["images"], **settings)
    assert str(raised.value) == expected


def test_errors_raise_and_never_exit(photos, tmp_path):
    with pytest.raises(retrain.RetrainError, match="how_many_training_steps"):
        retrain.train(photos["images"], how_many_training_step=10)  # a typo: close match named
    with pytest.raises(retrain.RetrainError, match="Unknown setting 'colour'"):
        retrain.train(photos["images"], colour="red")
    with pytest.raises(retrain.RetrainError, match="report must be True or False"):
        retrain.train(photos["images"], report="no")
    with pytest.raises(retrain.RetrainError, match="image_dir"):
        retrain.train(tmp_path / "no_such_folder", output_dir=tmp_path / "out")
    with pytest.raises(retrain.RetrainError, match="image_dir is required"):
        retrain.train()
    settings = tmp_path / "run.yaml"
    settings.write_text("learning_rte: 0.1\n")
    with pytest.raises(retrain.RetrainError, match="unknown keys"):
        retrain.train(photos["images"], config=settings)


def test_config_file_then_keywords(photos, tmp_path, monkeypatch):
    """config= is --config: its values under the keyword arguments."""
    settings = tmp_path / "run.yaml"
    settings.write_text(f"image_dir: {photos['images']}\npreset: best\nfine_tune_epochs: 5\n")
    seen = {}
    from retrain import run

    monkeypatch.setattr(run, "run", lambda config: seen.setdefault("config", config))
    monkeypatch.setattr("retrain.api.training._result", lambda config, outcome: config)
    config = retrain.train(config=settings, fine_tune_epochs=2, output_dir=tmp_path / "o")
    assert (config.preset, config.fine_tune_layers, config.fine_tune_epochs) == ("best", -1, 2)
    assert config == cli.resolve_config(
        ["--config", str(settings), "--fine_tune_epochs", "2", "--output_dir", str(tmp_path / "o")]
    )


def test_config_built_directly_applies_its_preset():
    best = presets.PRESETS["best"]
    config = Config(preset="best")
    assert {name: getattr(config, name) for name in best} == best
    assert config == presets.make_config(preset="best")
    # A value given explicitly wins, even one equal to fast's.
    assert Config(preset="best", flip_left_right=False).flip_left_right is False
    assert Config(preset="best", fine_tune_layers=0).fine_tune_layers == 0
    fast = {name: getattr(Config(), name) for name in best}
    assert fast == presets.PRESETS["fast"]


def test_importing_retrain_imports_no_tensorflow():
    code = (
        "import sys, retrain\n"
        "names = (retrain.train, retrain.load, retrain.RunResult, retrain.Classifier, "
        "retrain.Prediction, retrain.RetrainError)\n"
        "print(sorted({'tensorflow', 'keras'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
