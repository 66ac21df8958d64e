"""The cache under SIGKILL and concurrent builds, in real subprocesses.

Each subprocess imports TensorFlow and builds the real EfficientNet-Lite0, so
the runs take a few seconds each. Fold points are hit exactly by asking the
process to park there (``parking.driver`` wraps a function of that process
only); the other kills land
wherever the process happens to be.
"""

import json
import os
import signal
import subprocess
import sys
import time

import filelock
import h5py
import numpy as np
import parking
import pytest
from PIL import Image
from skimage import data

from retrain.cache import BottleneckCache
from retrain.data import images

BATCH = 4
BUILD = """
import json, sys
from retrain.data import images
from retrain.cache import BottleneckCache
found = images.discover(sys.argv[1])
report = BottleneckCache(sys.argv[2], "efficientnet_lite0").update(
    found, batch_size=int(sys.argv[3]), progress=False)
print(json.dumps({"extracted": report.extracted, "reused": report.reused,
                  "failed": report.failed}))
"""


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "photos"
    sources = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    for i in range(24):
        folder = root / ("ab"[i % 2])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = sources[i % 4][5 * i : 5 * i + 150, 3 * i : 3 * i + 170]
        Image.fromarray(pixels).save(folder / f"img{i:02d}.{('jpg', 'png')[i % 3 == 0]}")
    return root


@pytest.fixture(scope="module")
def clean_build(image_dir, tmp_path_factory):
    """{key: bottleneck} of an undisturbed build in this process."""
    found = images.discover(image_dir)
    cache = BottleneckCache(tmp_path_factory.mktemp("clean"), "efficientnet_lite0")
    assert cache.update(found, batch_size=BATCH, progress=False).extracted == 24
    return dict(zip((e.key for e in found.entries), cache.read(found.entries)))


def start(image_dir, cache_dir, pause=None, stderr=subprocess.PIPE):
    code = parking.driver(pause, BUILD) if pause else BUILD
    return subprocess.Popen(
        [sys.executable, "-c", code, str(image_dir), str(cache_dir), str(BATCH)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def wait_until(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"build ended ({process.returncode}) before the kill point: "
                f"{process.stderr.read() if process.stderr else ''}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.01)


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def finish(process):
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def assert_same_as_clean_build(cache_path, clean_build):
    with h5py.File(cache_path, "r") as file:
        keys = [k.decode() for k in file["images/key"][()]]
        vectors = file["images/bottleneck"][()].astype(np.float32)
        assert len(file["failed/key"]) == 0
    assert len(keys) == len(set(keys)), "duplicated rows"
    assert set(keys) == set(clean_build)
    for key, vector in zip(keys, vectors):
        np.testing.assert_allclose(vector, clean_build[key], rtol=2e-3, atol=2e-3)


def test_sigkill_at_any_point_then_rerun_equals_clean_build(image_dir, clean_build, tmp_path):
    cache_dir = tmp_path / "cache"
    path = BottleneckCache(cache_dir, "efficientnet_lite0").path
    journal = path.with_name(path.name + ".journal")

    def complete_journal_files():
        # Not "*.npz": that also matches a killed writer's hidden temporary.
        return list(journal.glob("[0-9]*.npz"))

    early = start(image_dir, cache_dir)  # still importing TensorFlow
    time.sleep(0.5)
    kill(early)

    anywhere = start(image_dir, cache_dir)  # mid-extraction, wherever it is
    wait_until(lambda: any(complete_journal_files()), anywhere)
    kill(anywhere)

    # What each kill must leave behind shows that the point was really hit.
    for pause, marker, left_behind in [
        (
            "journal:2",
            f"{journal}.paused",
            lambda: len(complete_journal_files()) == 2 and path.exists(),
        ),
        (
            "fold-before-replace",
            f"{path}.paused",
            lambda: list(cache_dir.glob("*.tmp-*")) and any(complete_journal_files()),
        ),
        (
            "fold-after-replace",
            f"{path}.paused",
            lambda: path.exists() and any(complete_journal_files()),
        ),
    ]:
        process = start(image_dir, cache_dir, pause)
        wait_until(lambda: os.path.exists(marker), process)
        kill(process)
        os.remove(marker)
        assert left_behind(), pause

    report, err = finish(start(image_dir, cache_dir))
    assert report["extracted"] + report["reused"] == 24 and report["failed"] == []
    assert report["reused"] >= 3 * BATCH, "the rerun did not resume"
    assert "moved it to" not in err
    assert not list(cache_dir.glob("*.corrupt-*"))
    assert not journal.exists() and not list(cache_dir.glob("*.tmp-*"))
    assert_same_as_clean_build(path, clean_build)


def test_two_concurrent_builds_wait_for_each_other(image_dir, clean_build, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    path = BottleneckCache(cache_dir, "efficientnet_lite0").path
    logs = [tmp_path / "first.err", tmp_path / "second.err"]
    # Holding the lock first makes both builds start together and contend.
    with filelock.FileLock(f"{path}.lock"):
        processes = []
        for log in logs:
            with open(log, "w") as stderr:
                processes.append(start(image_dir, cache_dir, stderr=stderr))
        for process, log in zip(processes, logs):
            wait_until(lambda: "Another process is updating" in log.read_text(), process)
    reports = [finish(process)[0] for process in processes]
    assert sorted(r["extracted"] for r in reports) == [0, 24]
    assert sorted(r["reused"] for r in reports) == [0, 24]
    assert_same_as_clean_build(path, clean_build)
