"""Presets (`--preset fast|best`): how they resolve and are overridden, what
settings.yaml records, and the end-of-run estimate of what `best` would cost."""

import re
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image
from skimage import data

from retrain import cli, presets
from retrain.cache import store
from retrain.config import Config, save_yaml

BEST = presets.PRESETS["best"]


def resolve(*argv):
    return cli.resolve_config(["--image_dir", "photos", *argv])


def preset_values(config):
    return {name: getattr(config, name) for name in BEST}


def test_fast_is_the_config_defaults_and_both_presets_set_the_same_fields():
    assert set(presets.PRESETS) == {"fast", "best"}
    assert set(presets.PRESETS["fast"]) == set(BEST)
    assert presets.PRESETS["fast"] == preset_values(Config())


def test_no_flags_give_fast_and_preset_best_gives_its_values():
    config = resolve()
    assert config.preset == "fast"
    assert preset_values(config) == presets.PRESETS["fast"]
    config = resolve("--preset", "best")
    assert config.preset == "best"
    assert preset_values(config) == BEST
    assert config.fine_tune_layers == -1 and config.test_time_flip
    # Fields no preset sets keep Config's defaults.
    assert config.learning_rate == Config().learning_rate


def test_flags_override_the_preset():
    config = resolve("--preset", "best", "--fine_tune_epochs", "3", "--no-flip_left_right")
    assert config.fine_tune_epochs == 3
    assert config.flip_left_right is False
    assert config.random_resized_crop == BEST["random_resized_crop"]
    # An explicit value equal to fast's still wins over best's.
    assert resolve("--preset", "best", "--fine_tune_layers", "0").fine_tune_layers == 0


def test_yaml_preset_with_yaml_keys_and_flags(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("image_dir: photos\npreset: best\nfine_tune_epochs: 5\n")
    config = cli.resolve_config(["--config", str(settings)])
    assert (config.preset, config.fine_tune_epochs, config.fine_tune_layers) == ("best", 5, -1)
    config = cli.resolve_config(["--config", str(settings), "--fine_tune_epochs", "2"])
    assert config.fine_tune_epochs == 2  # flag > YAML > preset
    # The flag names the preset over the file's; the file's keys still beat it.
    config = cli.resolve_config(["--config", str(settings), "--preset", "fast"])
    assert config.preset == "fast"
    assert config.fine_tune_layers == 0 and config.fine_tune_epochs == 5
    settings.write_text("image_dir: photos\nflip_left_right: false\n")
    config = cli.resolve_config(["--config", str(settings), "--preset", "best"])
    assert config.flip_left_right is False and config.fine_tune_layers == -1


def test_library_config_goes_the_same_way():
    config = presets.make_config(image_dir="photos", preset="best", fine_tune_epochs=3)
    assert config == resolve("--preset", "best", "--fine_tune_epochs", "3")
    assert presets.make_config(image_dir="photos") == resolve()


@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_bad_preset_name_is_one_line_and_exit_2(tmp_path, capsys, where):
    argv = ["--image_dir", str(tmp_path)]
    if where == "flag":
        argv += ["--preset", "quick"]
    else:
        (tmp_path / "run.yaml").write_text("preset: quick\n")
        argv += ["--config", str(tmp_path / "run.yaml")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().split("\n")
    assert lines == ["retrain: error: preset must be fast or best. Received: preset='quick'"]


def test_settings_yaml_records_the_resolved_values(tmp_path):
    config = resolve("--preset", "best", "--fine_tune_epochs", "3")
    save_yaml(config, tmp_path / "settings.yaml")
    saved = yaml.safe_load((tmp_path / "settings.yaml").read_text())
    assert saved["preset"] == "best"
    assert {name: saved[name] for name in BEST} == {**BEST, "fine_tune_epochs": 3}
    # Read back, it gives the same run, even under another --preset.
    again = cli.resolve_config(["--config", str(tmp_path / "settings.yaml")])
    assert again == config
    assert preset_values(
        cli.resolve_config(["--config", str(tmp_path / "settings.yaml"), "--preset", "fast"])
    ) == preset_values(config)


def test_estimate_arithmetic():
    cost = presets.FINE_TUNE_STEP_COST
    # 8 epochs of 1,000 training images (each `cost` forward passes) and 100
    # validation images, then 100 + 100 evaluated once, at 50 images/s.
    expected = (8 * (1000 * cost + 100) + 200) / 50
    assert presets.fine_tune_seconds(1000, 100, 8, 50.0, evaluated=200) == pytest.approx(expected)
    assert presets.fine_tune_seconds(1000, 0, 1, 10.0) == pytest.approx(1000 * cost / 10)
    # Twice the speed, half the time.
    assert presets.fine_tune_seconds(500, 50, 4, 100.0) == pytest.approx(
        presets.fine_tune_seconds(500, 50, 4, 50.0) / 2
    )


def test_estimate_line():
    line = presets.best_cost_line(3456, 432, 432, 112.0)
    seconds = presets.fine_tune_seconds(3456, 432, BEST["fine_tune_epochs"], 112.0, 864)
    assert line.startswith(
        f"--preset best would fine-tune 3,456 training images for {BEST['fine_tune_epochs']} "
        f"epochs: about {round(seconds / 60)} minutes here (measured 112 images/s"
    )
    assert presets.duration(40) == "about 40 seconds"
    assert presets.duration(21 * 60) == "about 21 minutes"
    assert presets.duration(2.5 * 3600) == "about 2.5 hours"


def test_no_estimate_after_fine_tuning_or_distortions_or_without_a_speed(caplog):
    buckets = SimpleNamespace(training=[0] * 10, validation=[0] * 2, testing=[0] * 2)
    with caplog.at_level("INFO", logger="retrain"):
        presets.log_best_cost(presets.make_config(preset="best"), buckets, 100.0)
        presets.log_best_cost(Config(flip_left_right=True), buckets, 100.0)
        presets.log_best_cost(Config(), buckets, None)
        assert not caplog.records
        presets.log_best_cost(Config(), buckets, 100.0)
    assert [record.getMessage() for record in caplog.records] == [
        presets.best_cost_line(10, 2, 2, 100.0)
    ]


def write_photos(root, per_class):
    """per_class crops of three real photos, one photo per class."""
    rng = np.random.default_rng(0)
    for name, pixels in (
        ("cat", data.chelsea()),
        ("coffee", data.coffee()),
        ("rocket", data.rocket()),
    ):
        (root / name).mkdir(parents=True, exist_ok=True)
        height, width = pixels.shape[:2]
        for number in range(per_class):
            top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
            crop = pixels[top : top + 3 * height // 4, left : left + 3 * width // 4]
            Image.fromarray(crop).save(root / name / f"{number}.jpg")


# Progress bars end their lines with "\r", so the note may follow one on its line.
ESTIMATE = re.compile(
    r"--preset best would fine-tune (\d+) training images for (\d+) epochs: about .* here "
    r"\(measured (\d+) images/s extracting"
)


def test_a_fast_run_says_what_best_would_cost_from_the_speed_kept_in_the_cache(tmp_path, capsys):
    photos, cache = tmp_path / "photos", tmp_path / "cache"
    write_photos(photos, per_class=6)
    argv = [
        *("--image_dir", str(photos), "--bottleneck_dir", str(cache)),
        *("--output_dir", str(tmp_path / "out"), "--no-report"),
        *("--how_many_training_steps", "20", "--extraction_batch_size", "6"),
        *("--testing_percentage", "0", "--validation_percentage", "0"),
    ]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    found = ESTIMATE.findall(captured.err)
    assert found and found[0][:2] == ("18", str(BEST["fine_tune_epochs"]))
    assert not ESTIMATE.search(captured.out)  # a note, on stderr only
    (main_file,) = cache.glob("*.h5")
    recorded = store.recorded_rate(main_file)
    assert recorded and f"{recorded:.0f}" == found[0][2]

    # Nothing extracted: the speed comes from the cache file.
    assert cli.main(argv) == 0
    assert ESTIMATE.findall(capsys.readouterr().err) == found
    # A few new images (fewer than RATED_IMAGES) do not replace the measured speed.
    write_photos(tmp_path / "more", per_class=2)
    (tmp_path / "more" / "cat" / "0.jpg").rename(photos / "cat" / "new.jpg")
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert store.recorded_rate(main_file) == recorded
    with h5py.File(main_file, "r") as file:
        assert "images/key" in file and file["images/key"].shape == (19,)


def test_rate_to_record_keeps_a_measured_speed_over_a_small_extraction(tmp_path):
    path = tmp_path / "cache.h5"
    assert store.rate_to_record(path, 0, 1.0) is None
    assert store.rate_to_record(path, 5, 0.5) == 10.0  # nothing recorded yet
    with h5py.File(path, "w") as file:
        file.attrs[store.RATE] = 40.0
    assert store.recorded_rate(path) == 40.0
    assert store.rate_to_record(path, store.RATED_IMAGES - 1, 1.0) is None
    assert store.rate_to_record(path, store.RATED_IMAGES, 2.0) == store.RATED_IMAGES / 2
    # A value that is not a positive number is no speed.
    with h5py.File(path, "w") as file:
        file.attrs[store.RATE] = -3.0
    assert store.recorded_rate(path) is None
    with h5py.File(path, "w") as file:
        file.attrs[store.RATE] = np.ones(4)
    assert store.recorded_rate(path) is None
