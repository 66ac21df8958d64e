"""Command line and settings: precedence, unknown keys, bad values, bad folders."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from retrain import cli
from retrain.config import Config, save_yaml


def write_image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def run_main(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_defaults_then_yaml_then_flags(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("image_dir: photos\nlearning_rate: 0.5\ntrain_batch_size: 7\n")
    config = cli.resolve_config(["--config", str(settings), "--learning_rate", "0.25"])
    assert config.image_dir == "photos"
    assert config.learning_rate == 0.25  # flag beats YAML
    assert config.train_batch_size == 7  # YAML beats default
    assert config.validation_percentage == Config().validation_percentage


def test_saved_settings_load_back_identically(tmp_path):
    config = cli.resolve_config(
        [
            "--image_dir",
            "photos",
            "--seed",
            "3",
            "--cache_only",
            "--tflite",
            "int8",
            "float32",
            "--saved_model_dir",
            "out/sm",
        ]
    )
    save_yaml(config, tmp_path / "settings.yaml")
    again = cli.resolve_config(["--config", str(tmp_path / "settings.yaml")])
    assert again == config


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path, capsys):
    settings = tmp_path / "run.yaml"
    settings.write_text("image_dir: photos\nlearning_rte: 0.5\n")
    status, _, err = run_main(capsys, "--config", str(settings))
    assert status == 2
    assert "learning_rte" in err and "Traceback" not in err


def test_tflite_kinds_from_yaml_and_flags(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("image_dir: photos\ntflite: [float16, int8]\n")
    assert cli.resolve_config(["--config", str(settings)]).tflite == ["float16", "int8"]
    assert cli.resolve_config(["--config", str(settings), "--tflite", "float32"]).tflite == [
        "float32"
    ]
    settings.write_text("image_dir: photos\ntflite: int8\n")
    config = cli.resolve_config(["--config", str(settings)])
    assert config.tflite == ["int8"]
    assert config.tflite_paths() == {"int8": Path("output") / "model_int8.tflite"}
    assert cli.resolve_config(["--image_dir", "photos"]).tflite == []


def test_saved_model_dir_holding_other_files_is_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    status, _, err = run_main(
        capsys, "--image_dir", str(tmp_path / "none"), "--saved_model_dir", str(folder)
    )
    assert status == 2 and "was not written by retrain" in err and err.count("\n") == 1
    assert (folder / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("learning_rate: fast\n", "learning_rate"),
        ("tflite: [int8, 3]\n", "tflite"),
        ("tflite: {int8: 1}\n", "list of strings"),
        ("- a\n- b\n", "mapping"),
        ("image_dir: [unclosed\n", "not valid YAML"),
        ("1: 2\nlearning_rte: 0.5\n", "learning_rte"),
        ("null: 1\ntypo: 2\n", "None"),
        ("? [a, b]\n: 1\n", "not valid YAML"),
    ],
)
def test_bad_yaml_values(tmp_path, capsys, text, fragment):
    settings = tmp_path / "run.yaml"
    settings.write_text(text)
    status, _, err = run_main(capsys, "--config", str(settings))
    assert status == 2 and fragment in err
    assert err.count("\n") == 1


def test_config_file_that_is_not_utf8_text(tmp_path, capsys):
    settings = tmp_path / "run.yaml"
    settings.write_bytes(b"\xff\xfe\x00image_dir: photos\n")
    status, _, err = run_main(capsys, "--config", str(settings))
    assert status == 2 and "run.yaml" in err and "UTF-8" in err
    assert err.count("\n") == 1


def test_missing_config_file(tmp_path, capsys):
    status, _, err = run_main(capsys, "--config", str(tmp_path / "absent.yaml"))
    assert status == 2 and "absent.yaml" in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "--image_dir is required"),
        (["--image_dir", "x", "--learning_rate", "-1"], "learning_rate=-1"),
        (["--image_dir", "x", "--how_many_training_steps", "0"], "how_many_training_steps=0"),
        (
            ["--image_dir", "x", "--testing_percentage", "60", "--validation_percentage", "40"],
            "testing_percentage=60",
        ),
        (["--image_dir", "x", "--validation_batch_size", "0"], "validation_batch_size=0"),
        (["--image_dir", "x", "--bottleneck_dtype", "int8"], "bottleneck_dtype='int8'"),
        (["--image_dir", "x", "--engine", "tpu"], "engine='tpu'"),
        (["--image_dir", "x", "--output_graph", "model.pb"], "output_graph='model.pb'"),
        (["--image_dir", "x", "--seed", "-1"], "seed=-1"),
        (["--image_dir", "x", "--seed", str(2**32)], f"seed={2**32}"),
        (["--image_dir", "x", "--learning_rate", "inf"], "learning_rate=inf"),
        (["--image_dir", "x", "--tflite", "int4"], "tflite=['int4']"),
        (
            ["--image_dir", "x", "--tflite", "int8", "float16", "int8"],
            "tflite=['int8', 'float16', 'int8']",
        ),
        (
            ["--image_dir", "x", "--output_dir", "out", "--saved_model_dir", "out"],
            "saved_model_dir=out",
        ),
        (
            ["--image_dir", "x", "--output_dir", "out/run", "--saved_model_dir", "out"],
            "saved_model_dir=out",
        ),
        (["--image_dir", "x", "--saved_model_dir", ""], "saved_model_dir="),
        (["--image_dir", "x", "--num_shards", "2"], "needs --cache_only"),
        (
            ["--image_dir", "x", "--cache_only", "--num_shards", "2", "--shard_index", "2"],
            "num_shards=2, shard_index=2",
        ),
        (["--image_dir", "x", "--cache_only", "--num_shards", "0"], "num_shards=0"),
    ],
)
def test_bad_values_exit_2_naming_the_value(capsys, argv, fragment):
    status, _, err = run_main(capsys, *argv)
    assert status == 2
    assert fragment in err
    assert err.count("\n") == 1  # one line


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--image_dir"], "--image_dir"),
        (["--learning_rate", "abc"], "'abc'"),
        (["--no_such_flag"], "--no_such_flag"),
    ],
)
def test_argparse_usage_errors_exit_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "--help" in err
    assert err.count("\n") == 1  # one line, not the whole usage


def test_missing_image_dir(tmp_path, capsys):
    status, _, err = run_main(capsys, "--image_dir", str(tmp_path / "nowhere"))
    assert status == 2 and "nowhere" in err


def test_one_class_is_not_enough(tmp_path, capsys):
    write_image(tmp_path / "photos" / "cats" / "a.png")
    status, _, err = run_main(
        capsys, "--image_dir", str(tmp_path / "photos"), "--bottleneck_dir", str(tmp_path / "cache")
    )
    assert status == 2 and "two classes" in err


def test_class_without_usable_images(tmp_path, capsys):
    write_image(tmp_path / "photos" / "cats" / "a.png")
    notes = tmp_path / "photos" / "dogs" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("not an image")
    status, _, err = run_main(
        capsys, "--image_dir", str(tmp_path / "photos"), "--bottleneck_dir", str(tmp_path / "cache")
    )
    assert status == 2 and "dogs" in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*.h5"))


def test_unknown_architecture_lists_the_known_ones(tmp_path, capsys):
    write_image(tmp_path / "photos" / "a" / "1.png")
    status, _, err = run_main(
        capsys, "--image_dir", str(tmp_path / "photos"), "--architecture", "alexnet"
    )
    assert status == 2 and "alexnet" in err and "efficientnet_lite0" in err


def test_real_process_exits_2_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "retrain", "--image_dir", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "nowhere" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    for name in yaml.safe_load(yaml.safe_dump(Config().__dict__)):
        assert f"--{name}" in out
    from retrain.training import datasets

    # The help quotes the cap on validation vectors; it must be the one in force.
    assert f"{datasets.MOST_VALIDATION_VECTORS:,}" in cli.HELP["validation_batch_size"]


def test_output_dir_that_is_a_file_fails_before_extraction(tmp_path, capsys):
    for label in ("cats", "dogs"):
        write_image(tmp_path / "photos" / label / "a.png")
    taken = tmp_path / "taken"
    taken.write_text("a file where the output folder should be")
    status, _, err = run_main(
        capsys,
        "--image_dir",
        str(tmp_path / "photos"),
        "--bottleneck_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(taken),
    )
    assert status == 2 and f"output_dir={taken}" in err and "Traceback" not in err
    assert not list(tmp_path.glob("cache/*.h5")), "extracted before checking the outputs"


def test_class_whose_images_all_fail_to_decode_is_named(tmp_path, capsys, monkeypatch):
    for label in ("cats", "dogs"):
        write_image(tmp_path / "photos" / label / "a.png")
    from retrain.cache import BottleneckCache, CacheReport

    def update(cache, image_list, batch_size=32, progress=True):
        return CacheReport(
            extracted=0, reused=1, path=cache.path, failed=[("dogs/a.png", "damaged PNG file")]
        )

    monkeypatch.setattr(BottleneckCache, "update", update)
    status, _, err = run_main(
        capsys,
        "--image_dir",
        str(tmp_path / "photos"),
        "--output_dir",
        str(tmp_path / "out"),
        "--testing_percentage",
        "0",
        "--validation_percentage",
        "0",
    )
    assert status == 2 and "no usable images" in err and "['dogs']" in err
    assert "testing_percentage" not in err, "blames the split for undecodable images"


def test_a_yaml_switch_can_be_turned_off_on_the_command_line(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("image_dir: photos\ncache_only: true\n")
    assert cli.resolve_config(["--config", str(settings)]).cache_only is True
    assert cli.resolve_config(["--config", str(settings), "--no-cache_only"]).cache_only is False
