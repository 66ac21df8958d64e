"""Whole runs under faults and hostile input, with the real EfficientNet-Lite0.

Class names that str.splitlines() would cut, signals, two runs on one output
folder, a full or read-only disk (a small tmpfs: root only, skipped otherwise),
a cache another program holds open or that the user may not read. Runs go
through `retrain.cli.main` in this process where that suffices, and through
real subprocesses where a signal or a second process is the point.
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import parking
import pytest
from conftest import fill, remount_read_only
from PIL import Image
from skimage import data

from retrain import cli, engines, export, label_image
from retrain.cache import BottleneckCache, store
from retrain.config import Config
from retrain.data import decode, images
from retrain.errors import RetrainError
from retrain.files import output_folder, run_marker

# Folder names that are legal on Linux and macOS and that broke labels.txt or
# its readers: accents, repeated spaces, U+2028, a tab, CJK.
NAMES = ["Crème brûlée", "two  spaces", "line\u2028sep", "tab\tname", "日本"]
PER_CLASS = 4
FAST = [
    "--how_many_training_steps",
    "20",
    "--eval_step_interval",
    "10",
    "--extraction_batch_size",
    "4",
    "--testing_percentage",
    "0",
    "--validation_percentage",
    "0",
]


def write_photos(root, names=NAMES):
    """PER_CLASS real photo crops per class, a different photo for each class."""
    sources = [
        data.chelsea(),
        data.coffee(),
        data.astronaut(),
        data.rocket(),
        data.immunohistochemistry(),
    ]
    rng = np.random.default_rng(0)
    for name, pixels in zip(names, sources):
        folder = root / name
        folder.mkdir(parents=True)
        height, width = pixels.shape[:2]
        for number in range(PER_CLASS):
            top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
            crop = pixels[top : top + 3 * height // 4, left : left + 3 * width // 4]
            Image.fromarray(crop).save(folder / f"{number}.jpg")
    return root


def contents(folder):
    """{relative path: bytes} of every file below folder."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    }


def error_lines(err):
    assert "Traceback" not in err, err
    # Progress bars end their lines with "\r", so a message may follow one on its line.
    return [line[line.index("retrain: ") :] for line in err.split("\n") if "retrain: " in line]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One run over the five hostile class names (plus a file whose name is not UTF-8)."""
    base = tmp_path_factory.mktemp("hostile")
    photos = write_photos(base / "photos")
    # A Latin-1 file name inside a class and a damaged file: neither stops the run.
    (photos / "日本" / "0.jpg").rename(os.fsdecode(bytes(photos / "日本") + b"/caf\xe9.jpg"))
    (photos / "line\u2028sep" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = base / "out"
    argv = [
        "--image_dir",
        str(photos),
        "--bottleneck_dir",
        str(base / "cache"),
        "--output_dir",
        str(out),
        *FAST,
    ]
    assert cli.main(argv) == 0
    return {"photos": photos, "cache": base / "cache", "out": out, "argv": argv}


def test_class_names_survive_labels_txt(hostile):
    assert export.read_labels(hostile["out"] / "labels.txt") == sorted(NAMES)


def test_label_image_returns_every_class_name_exactly(hostile, capsys):
    graph, labels = str(hostile["out"] / "model.keras"), str(hostile["out"] / "labels.txt")
    pictures = [str(hostile["photos"] / name / "1.jpg") for name in NAMES]
    common = ["--graph", graph, "--labels", labels, "--image", *pictures]
    assert label_image.main([*common, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    for result in document["results"]:
        assert sorted(p["label"] for p in result["predictions"]) == sorted(NAMES)
    assert label_image.main(common) == 0
    lines = capsys.readouterr().out.split("\n")  # only "\n" ends a line; U+2028 does not
    for name in NAMES:
        assert sum(line.startswith(f"  {name} (") for line in lines) == len(pictures), name


def test_skipped_list_keeps_one_line_per_image(hostile):
    lines = (hostile["out"] / "skipped_images.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 2
    path, reason = lines[0].split("\t")
    assert path == "line\\u2028sep/broken.jpg" and "truncated" in reason


def test_the_non_utf8_file_name_was_used(hostile, tmp_path, capsys):
    status = cli.main(
        [
            "--image_dir",
            str(hostile["photos"]),
            "--bottleneck_dir",
            str(hostile["cache"]),
            "--output_dir",
            str(tmp_path / "out"),
            "--cache_only",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0 and f"0 extracted, {len(NAMES) * PER_CLASS} reused, 1 skipped" in out


@pytest.mark.parametrize(
    "name, message",
    [
        (b"two\nlines", "single-line"),
        (b"carriage\rreturn", "single-line"),
        (b"caf\xe9", "not valid UTF-8"),
    ],
)
def test_class_names_labels_txt_cannot_hold_are_refused_up_front(tmp_path, capsys, name, message):
    photos = write_photos(tmp_path / "photos", ["fine", "other"])
    os.rename(photos / "other", os.fsdecode(bytes(photos) + b"/" + name))
    status = cli.main(
        [
            "--image_dir",
            str(photos),
            "--bottleneck_dir",
            str(tmp_path / "cache"),
            "--output_dir",
            str(tmp_path / "out"),
            *FAST,
        ]
    )
    [line] = error_lines(capsys.readouterr().err)
    assert status == 2 and message in line and "rename the class folder" in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_disk_full_or_read_only_while_writing_keeps_the_previous_run(hostile, small_mount, capsys):
    disk = small_mount("24m")  # one exported Lite0 model (14 MB) fits, two do not
    out = disk / "out"
    argv = [
        "--image_dir",
        str(hostile["photos"]),
        "--bottleneck_dir",
        str(hostile["cache"]),
        "--output_dir",
        str(out),
        *FAST,
    ]
    assert cli.main(argv) == 0
    before = contents(out)
    capsys.readouterr()

    assert cli.main([*argv, "--seed", "7"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "No space left on device" in line and str(disk) in line, line
    assert contents(out) == before
    assert sorted(os.listdir(disk)) == [".out.lock", "out"], "the failed run left files behind"

    remount_read_only(disk)
    assert cli.main([*argv, "--seed", "8"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "Read-only file system" in line and str(out) in line, line
    assert contents(out) == before


def start(argv, pause=None):
    command = ["-c", parking.cli_driver(pause, argv)] if pause else ["-m", "retrain", *argv]
    return subprocess.Popen(
        [sys.executable, *command], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_for(path, process, timeout=180):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            pytest.fail(f"run ended ({process.returncode}) early: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear in time")
        time.sleep(0.05)


@pytest.mark.parametrize(
    "signum, status, words",
    [
        (signal.SIGTERM, 143, "retrain: terminated (SIGTERM)"),
        (signal.SIGINT, 130, "retrain: interrupted"),
    ],
)
def test_a_signal_keeps_finished_batches_and_the_previous_outputs(
    tmp_path, capsys, signum, status, words
):
    photos = write_photos(tmp_path / "photos")
    cache, out = tmp_path / "cache", tmp_path / "out"
    with output_folder.staged(out) as previous:  # a previous run's folder, marker and all
        (previous.staging / "settings.yaml").write_text("the previous run\n")
        (previous.staging / "labels.txt").write_text("a\nb\n")
    before = contents(out)
    argv = [
        "--image_dir",
        str(photos),
        "--bottleneck_dir",
        str(cache),
        "--output_dir",
        str(out),
        *FAST,
    ]
    # The command line's engine (auto), which names the cache file.
    engine = engines.choose(Config().engine, "efficientnet_lite0")
    pending = Path(f"{BottleneckCache(cache, 'efficientnet_lite0', engine=engine).path}.journal")

    first = start(argv, pause="journal:1")  # parks after its first batch of 4 is journalled
    wait_for(f"{pending}.paused", first)
    # A second run into the same folder while the first is busy exits at once.
    assert cli.main(argv) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"{out} is in use by another retrain run" in line
    first.send_signal(signum)
    _, err = first.communicate(timeout=120)
    assert first.returncode == status
    [line] = error_lines(err)
    assert line.startswith(words)
    assert contents(out) == before
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "cache", "out", "photos"]
    assert len(list(pending.glob("[0-9]*.npz"))) == 1

    assert cli.main(argv) == 0  # the rerun resumes: only the unfinished images are extracted
    total = len(NAMES) * PER_CLASS
    printed = capsys.readouterr().out
    assert f"{total - 4} extracted (" in printed and "engine), 4 reused" in printed
    assert export.read_labels(out / "labels.txt") == sorted(NAMES)


# Free space left: none (the first journal batch fails). Room for the journal
# but not for the merge is no failure: the merge is deferred and the run reads
# the journal (tests/test_cache_space.py).
@pytest.mark.parametrize("free, journalled", [(0, 0)])
def test_full_disk_under_the_cache_keeps_old_rows_and_completes_later(
    tmp_path, small_mount, free, journalled
):
    found = images.discover(write_photos(tmp_path / "photos"))
    disk = small_mount("4m")  # the main file and its rewrite: one 655 kB chunk each
    cache = BottleneckCache(disk, "efficientnet_lite0")
    cache.update(replace(found, entries=found.entries[:8]), batch_size=4, progress=False)
    filler = fill(disk, leave=free)
    with pytest.raises(
        RetrainError, match=f"Cannot write the bottleneck cache {disk}.*No space left on device"
    ) as raised:
        cache.update(found, batch_size=4, progress=False)
    assert "\n" not in str(raised.value)
    assert len(cache.read(found.entries[:8])) == 8, "old rows lost"
    filler.unlink()
    report = cache.update(found, batch_size=4, progress=False)
    assert (report.extracted, report.reused) == (
        len(found.entries) - 8 - journalled,
        8 + journalled,
    )
    assert not [p for p in os.listdir(disk) if ".tmp-" in p or ".corrupt-" in p]


@pytest.fixture
def small_cache(tmp_path):
    found = images.discover(write_photos(tmp_path / "photos", NAMES[:2]))
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    cache = BottleneckCache(folder, "efficientnet_lite0")
    cache.update(replace(found, entries=found.entries[:4]), progress=False)
    return found, cache


def test_a_cache_another_program_holds_open_is_not_set_aside(small_cache):
    found, cache = small_cache
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import h5py, sys, time\nf = h5py.File(sys.argv[1], 'a')\n"
            "print('open', flush=True)\ntime.sleep(300)",
            str(cache.path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(RetrainError, match="Another program has the file open"):
            cache.update(found, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not list(cache.path.parent.glob("*.corrupt-*"))
    assert cache.update(found, progress=False).reused == 4


def test_a_cache_the_user_may_not_read_is_not_set_aside(small_cache):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user for a permission error")
    found, cache = small_cache
    # nobody may enter every folder and create files in the cache folder, but
    # not read the cache file itself.
    folders = [cache.path.parent, *cache.path.parent.parents]
    folders = folders[: folders.index(Path(tempfile.gettempdir()))]
    modes = {folder: folder.stat().st_mode for folder in folders}
    for folder in folders:
        os.chmod(folder, 0o777 if folder == cache.path.parent else 0o755)
    os.chmod(f"{cache.path}.lock", 0o666)
    os.chmod(cache.path, 0o600)
    os.seteuid(65534)
    try:
        with pytest.raises(
            RetrainError, match="Cannot write the bottleneck cache .*Permission denied"
        ):
            cache.update(found, progress=False)
        with pytest.raises(PermissionError):
            store.open_or_set_aside(cache.path, cache.identity)
    finally:
        os.seteuid(0)
        for folder, mode in modes.items():
            os.chmod(folder, mode)
    assert not list(cache.path.parent.glob("*.corrupt-*"))
    assert cache.update(found, progress=False).reused == 4


def test_out_of_memory_is_not_remembered_and_over_budget_images_are_listed(tmp_path, monkeypatch):
    root = write_photos(tmp_path / "photos", NAMES[:2])
    big = Image.fromarray(data.astronaut()).resize((1000, 1000))
    big.save(root / NAMES[0] / "big.png")  # no reduced-size decode: 12 MB at full size
    big.save(root / NAMES[1] / "big.jpg")  # decoded at 1/2 scale: 6 MB
    Image.fromarray(data.coffee()).resize((333, 222)).save(root / NAMES[1] / "victim.jpg")
    monkeypatch.setattr(decode, "MEMORY_BUDGET", 8 * 2**20)  # the crops need 4-5 MB
    real_to_rgb = decode._to_rgb

    def short_of_memory(image):
        # A real MemoryError is raised in test_decode.py under an address-space
        # cap; TensorFlow cannot run under one, so here it is raised for one image.
        if image.size == (333, 222):
            raise MemoryError
        return real_to_rgb(image)

    monkeypatch.setattr(decode, "_to_rgb", short_of_memory)
    real_turbo = decode.simplejpeg.decode_jpeg

    def turbo_short_of_memory(content, *args, min_width=0, **kwargs):
        if min_width == 333:  # the victim, decoded by simplejpeg (a plain colour JPEG)
            raise MemoryError
        return real_turbo(content, *args, min_width=min_width, **kwargs)

    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", turbo_short_of_memory)
    found = images.discover(root)
    cache = BottleneckCache(tmp_path / "cache", "efficientnet_lite0")
    first = cache.update(found, progress=False)
    reasons = dict(first.failed)
    assert set(reasons) == {f"{NAMES[0]}/big.png", f"{NAMES[1]}/victim.jpg"}
    assert reasons[f"{NAMES[1]}/victim.jpg"].startswith("out of memory while decoding it")
    assert "1000x1000 PNG needs about 12 MB, the budget is 8 MB" in reasons[f"{NAMES[0]}/big.png"]
    assert first.extracted == len(found.entries) - 2  # big.jpg among them

    monkeypatch.setattr(decode, "_to_rgb", real_to_rgb)
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", real_turbo)
    second = cache.update(found, progress=False)
    assert second.extracted == 1, "the out-of-memory image was remembered as a bad image"
    assert [path for path, _ in second.failed] == [f"{NAMES[0]}/big.png"]


def one_complete_run(out):
    """Asserts that `out` holds exactly the files of one complete run; returns (run id, names).

    The marker is complete and lists every file present, no more and no fewer,
    and the model is a whole zip archive.
    """
    marker = run_marker.read_marker(out)
    assert marker is not None and marker.files is not None, f"no complete run marker in {out}"
    assert run_marker.written_names(out) == marker.files, "files missing or left over"
    with zipfile.ZipFile(out / "model.keras") as model:
        assert model.testzip() is None
    assert export.read_labels(out / "labels.txt") == sorted(NAMES[:2])
    return marker.run_id, {name for name in marker.files if "/" not in name.rstrip("/")}


def test_sigkill_at_random_moments_leaves_one_complete_run(tmp_path):
    """A full run into an existing folder, killed at 4 seeded moments spread over a run's
    duration and once at its swap: the folder always holds the old or the new run, whole,
    and beside it only what the next run finishes (which it does)."""
    photos = write_photos(tmp_path / "photos", NAMES[:2])
    out = tmp_path / "out"
    argv = [
        "--image_dir",
        str(photos),
        "--bottleneck_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(out),
        "--no-report",
        "--how_many_training_steps",
        "5",
        "--extraction_batch_size",
        "8",
        "--testing_percentage",
        "0",
        "--validation_percentage",
        "0",
    ]
    seen = set()
    for seed in (0, 1):  # the first fills the cache; the second, timed, is what is killed
        started = time.monotonic()
        first = start([*argv, "--seed", str(seed)])
        assert first.wait(timeout=300) == 0, first.communicate()[1]
        last, names = one_complete_run(out)
        seen.add(last)
    duration = time.monotonic() - started
    rng = random.Random(21)
    moments = [(index + rng.random()) / 4 * duration for index in range(4)] + ["swap"]
    leftovers = {".out.checkpoint"}
    for seed, moment in enumerate(moments, start=2):
        process = start([*argv, "--seed", str(seed)])
        staging = tmp_path / f".out.staging-{process.pid}"
        if moment == "swap":  # once the staging folder's marker is complete
            deadline = time.monotonic() + 300
            while (
                process.poll() is None
                and time.monotonic() < deadline
                and getattr(run_marker.read_marker(staging), "files", None) is None
            ):
                time.sleep(0.001)
        else:
            time.sleep(moment)
        process.kill()
        process.communicate()
        run_id, found = one_complete_run(out)
        assert found == names and (run_id == last or run_id not in seen), moment
        last = run_id
        seen.add(run_id)
        # A run killed before it cleared its predecessors' folders leaves those too
        # (on a loaded machine its start-up can outlast the moment); the last run clears all.
        leftovers |= {staging.name, f".out.previous-{process.pid}"}
        beside = set(os.listdir(tmp_path)) - {"photos", "cache", "out", ".out.lock"}
        assert beside <= leftovers, beside
    done = subprocess.run([sys.executable, "-m", "retrain", *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert one_complete_run(out)[0] not in seen
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "cache", "out", "photos"]


def test_an_unknown_detector_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, caplog):
    """The sidecar is secondary: a disk that refuses it leaves a run that labels, without
    'unknown', and says so on one line."""
    import errno
    import logging

    from retrain.export import unknown_file

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(unknown_file, "save", disk_full)
    photos = write_photos(tmp_path / "photos", NAMES[:2])
    out = tmp_path / "out"
    argv = ["--image_dir", str(photos), "--bottleneck_dir", str(tmp_path / "cache")]
    with caplog.at_level(logging.WARNING):
        assert cli.main([*argv, "--output_dir", str(out), *FAST]) == 0
    assert "Cannot write the unknown detector" in caplog.text
    assert "No space left on device" in caplog.text
    assert (out / "model.keras").is_file() and not (out / "model.unknown.h5").exists()
