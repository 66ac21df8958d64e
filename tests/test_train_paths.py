"""The distortion and fine-tuning paths on real photos with the real Lite0 weights.

The photos are small crops of scikit-image's chelsea, coffee and rocket, at
the backbone's input size in training but few of them, with one short epoch.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain import backbones, cli, export
from retrain.data import distortions, pixel_batches
from retrain.quiet_tensorflow import import_tensorflow
from retrain.training import checkpoints, datasets, fine_tune
from retrain.training.checkpoints import Checkpoint
from retrain.training.settings import FineTuneSettings

tf = import_tensorflow()
import keras  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}
PER_CLASS = 8
SIZE = 224
# Tiny runs: few head steps, one small fine-tuning epoch.
FAST = [
    "--how_many_training_steps",
    "20",
    "--eval_step_interval",
    "10",
    "--testing_percentage",
    "20",
    "--validation_percentage",
    "20",
    "--seed",
    "3",
]


def write_photos(folder, rng):
    """PER_CLASS 48x48 crops of each photo, flipped at random: PNG files."""
    for name, pixels in PHOTOS.items():
        (folder / name).mkdir(parents=True)
        height, width, _ = pixels.shape
        for number in range(PER_CLASS):
            h, w = (int(side * rng.uniform(0.6, 0.9)) for side in (height, width))
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            crop = pixels[top : top + h, left : left + w][:, :: rng.choice([-1, 1])]
            Image.fromarray(np.ascontiguousarray(crop)).resize((48, 48)).save(
                folder / name / f"{number}.png"
            )


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paths") / "photos"
    write_photos(folder, np.random.default_rng(0))
    return folder


def run_main(capsys, *argv):
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def file_digests(folder):
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    }


def test_distorted_batches_differ_between_epochs_and_from_plain_pixels(photos):
    paths = sorted(photos.rglob("*.png"))[:4]
    plain = next(iter(pixel_batches.image_batches(paths, SIZE, 4)))[1].numpy()
    distort = distortions.distortion_function(
        SIZE, flip_left_right=True, random_crop=20, random_scale=20, random_brightness=20
    )
    # One iterator through two epochs, as training runs it.
    epochs = pixel_batches.image_batches(paths, SIZE, 4, distort=distort).repeat().take(2)
    first, second = (batch[1].numpy() for batch in epochs)
    assert first.shape == plain.shape == (4, SIZE, SIZE, 3) and first.dtype == np.float32
    assert first.min() >= 0 and first.max() <= 255
    for image in range(4):
        assert not np.allclose(first[image], plain[image], atol=1)
        assert not np.allclose(second[image], plain[image], atol=1)
        assert not np.allclose(first[image], second[image], atol=1)


def test_no_distortion_is_no_function():
    assert distortions.distortion_function(SIZE) is None


def test_distortion_run_trains_and_leaves_the_cache_bytes_untouched(photos, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    status, _, err = run_main(
        capsys,
        "--image_dir",
        photos,
        "--bottleneck_dir",
        cache,
        "--output_dir",
        tmp_path / "plain",
        "--cache_only",
    )
    assert status == 0, err
    before = file_digests(cache)
    status, stdout, err = run_main(
        capsys,
        "--image_dir",
        photos,
        "--bottleneck_dir",
        cache,
        "--output_dir",
        out,
        "--flip_left_right",
        "--random_crop",
        10,
        "--random_scale",
        10,
        "--random_brightness",
        10,
        *FAST,
    )
    assert status == 0, err
    assert "0 extracted, 24 reused" in stdout
    assert file_digests(cache) == before
    assert (out / "summaries" / "train").is_dir() and (out / "summaries" / "validation").is_dir()
    assert not (tmp_path / ".out.checkpoint" / "distortions").exists()  # removed after success
    model = export.load_classifier(out / "model.keras")
    probabilities = model(np.stack([PHOTOS["cat"][:200, :200]]).astype(np.float32)).numpy()
    assert probabilities.shape == (1, 3)


def weights_by_layer(model):
    return {layer.name: [w.numpy().copy() for w in layer.weights] for layer in model.layers}


def test_fine_tuning_changes_only_the_chosen_layers_and_no_batchnorm_statistics(photos):
    spec = backbones.get("efficientnet_lite0")
    backbone = backbones.load(spec.name)
    head = keras.Sequential(
        [keras.Input((spec.feature_dim,)), keras.layers.Dense(3, activation="softmax")]
    )
    before = weights_by_layer(backbone)
    entries = [
        type(
            "Entry",
            (),
            {
                "relative_path": str(path.relative_to(photos)),
                "label_index": list(PHOTOS).index(path.parent.name),
            },
        )()
        for path in sorted(photos.rglob("*.png"))
    ][::3]
    training = datasets.decoded_training(photos, entries, SIZE, 4, seed=0)
    top = 12
    result = fine_tune.fine_tune(
        backbone,
        head,
        training,
        None,
        FineTuneSettings(layers=top, epochs=1, learning_rate=1e-3, batch_size=4, progress=False),
        input_size=SIZE,
        steps_per_epoch=2,
        checkpoint=Checkpoint(photos.parent / "checkpoint", "x"),
    )
    chosen = {layer.name for layer in backbone.layers[-top:]}
    assert set(result.trainable_layers) == {
        layer.name
        for layer in backbone.layers[-top:]
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    }
    assert result.trainable_layers  # top_conv, the last blocks' project/expand convs ...
    after = weights_by_layer(backbone)
    for layer in backbone.layers:
        changed = any(
            not np.array_equal(a, b) for a, b in zip(before[layer.name], after[layer.name])
        )
        if isinstance(layer, keras.layers.BatchNormalization):
            # gamma, beta, moving mean and moving variance, bit for bit.
            assert not changed, layer.name
        elif layer.name in result.trainable_layers:
            assert changed, layer.name
        else:
            assert not changed, layer.name
    assert all(
        layer.name in chosen for layer in backbone.layers if layer.name in result.trainable_layers
    )
    assert all(layer.trainable for layer in backbone.layers)  # as loaded, for export


def test_fine_tuning_weights_its_loss_by_class(photos):
    """--class_weights reaches fine-tuning: with every class weighted 0 the loss is 0,
    so nothing moves; class 0 alone weighted moves the same layers as an unweighted run."""
    spec = backbones.get("efficientnet_lite0")
    entries = [
        type(
            "Entry",
            (),
            {
                "relative_path": str(path.relative_to(photos)),
                "label_index": list(PHOTOS).index(path.parent.name),
            },
        )()
        for path in sorted(photos.rglob("*.png"))
    ][::3]
    moved = {}
    for name, weights in (("none", np.zeros(3)), ("first", np.array([1.0, 0.0, 0.0]))):
        backbone = backbones.load(spec.name)
        head = keras.Sequential(
            [keras.Input((spec.feature_dim,)), keras.layers.Dense(3, activation="softmax")]
        )
        before = [w.numpy().copy() for w in backbone.weights + head.weights]
        fine_tune.fine_tune(
            backbone,
            head,
            datasets.decoded_training(photos, entries, SIZE, 4, seed=0),
            None,
            FineTuneSettings(
                layers=12,
                epochs=1,
                learning_rate=1e-3,
                batch_size=4,
                progress=False,
                class_weights=weights,
            ),
            input_size=SIZE,
            steps_per_epoch=2,
            checkpoint=Checkpoint(photos.parent / f"checkpoint-{name}", name),
        )
        after = [w.numpy() for w in backbone.weights + head.weights]
        moved[name] = sum(not np.array_equal(a, b) for a, b in zip(before, after))
    assert moved["none"] == 0
    assert moved["first"] > 0


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--random_crop", "-5"], "random_crop"),
        (["--random_scale", "-1"], "random_scale"),
        (["--random_brightness", "150"], "random_brightness"),
        (["--fine_tune_layers", "-2"], "fine_tune_layers"),
        (["--fine_tune_epochs", "0"], "fine_tune_epochs"),
        (["--fine_tune_learning_rate", "0"], "fine_tune_learning_rate"),
        (["--fine_tune_layers", "100000"], "fine_tune_layers=100000"),
        # avg_pool, top_activation and top_bn: nothing that fine-tuning may train.
        (["--fine_tune_layers", "3"], "nothing to train"),
    ],
)
def test_bad_values_exit_2_with_one_line(photos, tmp_path, capsys, argv, fragment):
    status, out, err = run_main(
        capsys,
        "--image_dir",
        photos,
        "--bottleneck_dir",
        tmp_path / "cache",
        "--output_dir",
        tmp_path / "out",
        *argv,
    )
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "cache").exists()  # refused before any extraction


# Runs retrain's command line with a callback injected into the checkpointed
# fits (`retrain.run.run`'s after_checkpoint seam): after the first epoch's
# checkpoint is saved, it touches a marker and parks the process forever.
PARK_AFTER_FIRST_CHECKPOINT = """
import functools, time
from pathlib import Path
from retrain import cli, run
from retrain.quiet_tensorflow import import_tensorflow
import_tensorflow()
import keras

class ParkAfterFirstCheckpoint(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            Path({marker!r}).touch()
            while True:
                time.sleep(60)

run.run = functools.partial(run.run, after_checkpoint=[ParkAfterFirstCheckpoint()])
cli.exit_without_teardown(cli.main({argv!r}))
"""


def start(photos, folder, *extra, park_marker=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [
        "--image_dir",
        str(photos),
        "--bottleneck_dir",
        str(folder / "cache"),
        "--output_dir",
        str(folder / "out"),
        "--fine_tune_layers",
        "20",
        "--fine_tune_epochs",
        "2",
        "--fine_tune_batch_size",
        "8",
        "--flip_left_right",
        *FAST,
        *extra,
    ]
    command = (
        ["-c", PARK_AFTER_FIRST_CHECKPOINT.format(marker=str(park_marker), argv=argv)]
        if park_marker
        else ["-m", "retrain", *argv]
    )
    return subprocess.Popen(
        [sys.executable, *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def kill_after_first_checkpoint(photos, folder, *extra):
    marker = folder / ".out.checkpoint" / "fine_tune.paused"
    process = start(photos, folder, *extra, park_marker=marker)
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    marker.unlink()
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    return err


def test_killed_fine_tuning_resumes_from_its_checkpoint_and_finishes(photos, tmp_path):
    kill_after_first_checkpoint(photos, tmp_path)
    done = start(photos, tmp_path)
    out, err = done.communicate(timeout=900)
    assert done.returncode == 0, err
    assert "resumes from the checkpoint" in err and "1 of 2 epochs" in err
    assert "Traceback" not in err
    assert not (tmp_path / ".out.checkpoint" / "fine_tune").exists()
    model = export.load_classifier(tmp_path / "out" / "model.keras")
    assert model.output_shape == (None, 3)


def test_a_checkpoint_of_other_settings_or_images_is_discarded(tmp_path, caplog):
    folder = tmp_path / "checkpoint"
    assert checkpoints.resume_point(folder, "run-a", 3, "Fine-tuning") == 0  # fresh
    (folder / checkpoints.EPOCH_FILE).write_text('{"epoch": 2, "batch": 0}')
    (folder / "latest.weights.h5").write_bytes(b"weights")
    assert checkpoints.resume_point(folder, "run-a", 3, "Fine-tuning") == 2
    assert "resumes from the checkpoint" in caplog.text and "2 of 3 epochs" in caplog.text
    caplog.clear()
    assert checkpoints.resume_point(folder, "run-b", 3, "Fine-tuning") == 0
    assert "starts over" in caplog.text
    assert (
        not (folder / "latest.weights.h5").exists()
        and not (folder / checkpoints.EPOCH_FILE).exists()
    )


def test_the_fingerprint_follows_settings_and_images():
    images = [["cat/0.png", 0, "training", 100, 1]]
    same = checkpoints.run_fingerprint({"lr": 1e-4}, images)
    assert same == checkpoints.run_fingerprint({"lr": 1e-4}, [list(images[0])])
    assert same != checkpoints.run_fingerprint({"lr": 2e-4}, images)
    assert same != checkpoints.run_fingerprint({"lr": 1e-4}, [["cat/0.png", 0, "training", 100, 2]])
