"""Shared test set-up: an isolated RETRAIN_HOME for the whole session, small
mounts, a model trained on real photos, backbone builds shared within a test module."""

import collections
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from retrain import backbones


@pytest.fixture(scope="session", autouse=True)
def retrain_home(tmp_path_factory):
    """Converted backbone weights go to a per-session folder, not ~/.cache."""
    home = tmp_path_factory.mktemp("retrain_home")
    previous = os.environ.get("RETRAIN_HOME")
    os.environ["RETRAIN_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("RETRAIN_HOME", None)
    else:
        os.environ["RETRAIN_HOME"] = previous


@pytest.fixture
def small_mount(tmp_path):
    """mount(size) -> a fresh tmpfs folder of `size` (e.g. "64k"), unmounted after the test.

    For disk-full and read-only tests on real files. Needs root (or
    CAP_SYS_ADMIN); the test is skipped with the reason otherwise.
    """
    points = []

    def mount(size, name="small"):
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs for disk-full tests needs root")
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        points.append(point)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount_read_only(point):
    """Makes a mount from `small_mount` read-only (EROFS on every write)."""
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True, capture_output=True)


def fill(folder, leave=0):
    """Fills the file system of `folder` with a file, leaving about `leave` bytes free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    filler = Path(folder) / "filler"
    with open(filler, "wb") as handle:
        handle.write(bytes(max(0, free - leave)))
    return filler


PHOTOS = {"cat": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}
VARIANTS = 6  # per class: random crops, flips and brightness


def variants(pixels, rng):
    """Crops of 60-90% of each side, flipped half the time, brightness x0.8-1.2: uint8 [h, w, 3]."""
    height, width, _ = pixels.shape
    out = []
    for _ in range(VARIANTS):
        h, w = (int(side * rng.uniform(0.6, 0.9)) for side in (height, width))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        crop = pixels[top : top + h, left : left + w]
        crop = crop[:, ::-1] if rng.random() < 0.5 else crop
        out.append(np.clip(crop * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="session")
def photo_model(tmp_path_factory):
    """A classifier trained on Lite0 vectors of photo variants, saved with its labels.

    scikit-image's chelsea, coffee and rocket, 6 random crops each (PNG files
    in root/photos/<class>/<n>.png). Returns graph, labels, photos, root,
    names (classes in output order) and variants (images per class).
    """
    from PIL import Image

    from retrain import backbones, export
    from retrain.data import decode, resizing
    from retrain.training.head import train_head
    from retrain.training.settings import HeadSettings

    root = tmp_path_factory.mktemp("label_image")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for index, (name, pixels) in enumerate(PHOTOS.items()):
        (root / "photos" / name).mkdir(parents=True)
        for number, variant in enumerate(variants(pixels, rng)):
            path = root / "photos" / name / f"{number}.png"
            Image.fromarray(variant).save(path)
            paths.append(path)
            labels.append(index)
    spec = backbones.get("efficientnet_lite0")
    backbone = backbones.load(spec.name)
    # Decoded and resized as the bottleneck cache does.
    pixels = np.stack(
        [
            resizing.resize_to_input(
                decode.decode_rgb(path, target_size=spec.input_size), spec.input_size
            )
            for path in paths
        ]
    )
    bottlenecks = backbone.predict(pixels, verbose=0)
    labels = np.array(labels)
    validation = np.arange(len(paths)) % VARIANTS == 0
    trained = train_head(
        bottlenecks[~validation],
        labels[~validation],
        bottlenecks[validation],
        labels[validation],
        len(PHOTOS),
        HeadSettings(
            how_many_training_steps=300,
            learning_rate=0.003,
            train_batch_size=100,
            validation_batch_size=-1,
            eval_step_interval=10,
            seed=0,
            progress=False,
        ),
    )
    graph = export.save_classifier(
        export.build_classifier(backbone, trained.head, spec.input_size), root / "model.keras"
    )
    labels_file = export.write_labels(list(PHOTOS), root / "labels.txt")
    return {
        "graph": str(graph),
        "labels": str(labels_file),
        "photos": root / "photos",
        "root": root,
        "names": list(PHOTOS),
        "variants": VARIANTS,
    }


@pytest.fixture(scope="module")
def backbone_builds():
    """backbones.load builds each network once per module; counts the requests."""
    requests, models = collections.Counter(), {}
    real_load = backbones.load

    def load(name, include_top=False, weights_file=None):
        requests[name] += 1
        if name not in models:
            models[name] = real_load(name, include_top, weights_file)
        return models[name]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbones, "load", load)
        yield requests
