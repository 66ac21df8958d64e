"""One complete run per output folder (retrain/files/output_folder.py) and atomic writes
(retrain/files/atomic_write.py), on real folders; disk full and read-only on a small tmpfs."""

import errno
import os

import pytest
from conftest import fill, remount_read_only

from retrain.errors import RetrainError
from retrain.files import atomic_write, output_folder, run_marker


def write_run(folder, number, extra=()):
    """What a run writes: settings.yaml, a model and any extra files, all tagged with `number`."""
    (folder / "settings.yaml").write_text(f"run: {number}\n")
    (folder / "model.keras").write_bytes(bytes([number]) * 1000)
    (folder / "summaries").mkdir()
    (folder / "summaries" / "events").write_text(str(number))
    for name in extra:
        (folder / name).write_text(str(number))


def contents(folder):
    """{relative path: bytes} of every file below folder but the run marker."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != run_marker.MARKER
    }


def test_a_completed_run_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "out"
    with output_folder.staged(out) as folder:
        write_run(folder.staging, 1, extra=["skipped_images.txt"])
        assert not out.exists(), "outputs appeared before the run finished"
    assert contents(out)["settings.yaml"] == b"run: 1\n"
    with output_folder.staged(out) as folder:
        write_run(folder.staging, 2)
        assert contents(out)["settings.yaml"] == b"run: 1\n"
    # Nothing of run 1 is left beside run 2's files, nor any staging folder.
    assert contents(out) == {
        "settings.yaml": b"run: 2\n",
        "model.keras": bytes([2]) * 1000,
        "summaries/events": b"2",
    }
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]
    marker = run_marker.read_marker(out)  # the run's id and every name it wrote
    assert marker.run_id == folder.run_id and len(marker.run_id) == 32
    assert marker.files == {"settings.yaml", "model.keras", "summaries/", "summaries/events"}


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt(), RetrainError("bad input")],
)
def test_a_failed_run_leaves_the_previous_outputs(tmp_path, failure):
    out = tmp_path / "out"
    with output_folder.staged(out) as folder:
        write_run(folder.staging, 1)
    before = contents(out)
    with pytest.raises(type(failure) if not isinstance(failure, OSError) else RetrainError):
        with output_folder.staged(out) as folder:
            write_run(folder.staging, 2)
            raise failure
    assert contents(out) == before
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


def test_a_second_run_on_a_folder_in_use_exits_saying_so(tmp_path):
    out = tmp_path / "out"
    with output_folder.staged(out) as first:
        with pytest.raises(RetrainError, match=f"{out} is in use by another retrain run"):
            with output_folder.staged(out):
                pass
        write_run(first.staging, 1)
    assert contents(out)["settings.yaml"] == b"run: 1\n"


def test_the_swap_works_without_rename_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_write, "_exchange", lambda first, second: False)
    out = tmp_path / "out"
    for number in (1, 2):
        with output_folder.staged(out) as folder:
            write_run(folder.staging, number)
    assert contents(out)["settings.yaml"] == b"run: 2\n"
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


def test_files_outside_the_folder_are_renamed_at_the_end(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "models" / "flowers.keras"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        with output_folder.staged(out) as folder:
            folder.place(elsewhere).write_bytes(b"new")
            raise KeyboardInterrupt
    assert (
        os.listdir(elsewhere.parent) == ["flowers.keras"] and elsewhere.read_bytes() == b"previous"
    )
    with output_folder.staged(out) as folder:
        assert folder.place(out / "labels.txt") == folder.staging / "labels.txt"
        assert folder.place_folder(tmp_path / "logs") == tmp_path / "logs"
        write_run(folder.staging, 1)
        folder.place(elsewhere).write_bytes(b"new")
        assert elsewhere.read_bytes() == b"previous"
    assert os.listdir(elsewhere.parent) == ["flowers.keras"] and elsewhere.read_bytes() == b"new"


def test_folders_a_swap_would_destroy_are_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("months of work")
    with pytest.raises(RetrainError, match="holds files but no .retrain-run.json.*thesis.tex"):
        with output_folder.staged(tmp_path / "notes"):
            pass
    photos = tmp_path / "out" / "photos"
    photos.mkdir(parents=True)
    with pytest.raises(RetrainError, match="image_dir lies inside output_dir"):
        with output_folder.staged(tmp_path / "out", [("image_dir", str(photos))]):
            pass
    (tmp_path / "taken").write_text("a file")
    for bad in (tmp_path / "taken", tmp_path / "taken" / "out"):
        with pytest.raises(RetrainError, match=f"Received: output_dir={bad}"):
            with output_folder.staged(bad):
                pass
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "months of work"


@pytest.fixture
def previous_run(small_mount):
    """(disk, out, contents) after one run into out on a 512 kB tmpfs."""
    disk = small_mount("512k")
    out = disk / "out"
    with output_folder.staged(out) as folder:
        write_run(folder.staging, 1)
    return disk, out, contents(out)


def test_disk_full_names_the_folder_and_keeps_the_previous_outputs(previous_run):
    disk, out, before = previous_run
    with pytest.raises(RetrainError) as raised:
        with output_folder.staged(out) as folder:
            write_run(folder.staging, 2)
            (folder.staging / "big").write_bytes(bytes(1 << 20))
    message = str(raised.value)
    assert f"in {disk}: No space left on device" in message and "\n" not in message
    assert contents(out) == before
    assert sorted(os.listdir(disk)) == [".out.lock", "out"]
    with output_folder.staged(out) as folder:  # space is back once the failed run is gone
        write_run(folder.staging, 3)
    assert contents(out)["settings.yaml"] == b"run: 3\n"


def test_read_only_folder_names_the_folder_and_keeps_the_previous_outputs(previous_run):
    disk, out, before = previous_run
    remount_read_only(disk)
    with pytest.raises(RetrainError, match=f"{out}: Read-only file system") as raised:
        with output_folder.staged(out):
            pass
    assert "\n" not in str(raised.value)
    assert contents(out) == before


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "labels.txt"
    atomic_write.write_text(target, "old\n")
    with pytest.raises(OSError):
        with atomic_write.atomic_path(target) as temporary:
            temporary.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["labels.txt"]
    atomic_write.write_text(target, "new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["labels.txt"]


def test_atomic_write_on_a_full_disk_leaves_the_old_file_and_no_temporary(small_mount):
    disk = small_mount("64k")
    target = disk / "model.keras"
    atomic_write.write_bytes(target, b"previous")
    fill(disk, leave=8192)
    with pytest.raises(OSError) as raised:
        atomic_write.write_bytes(target, bytes(64 * 1024))
    assert raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(disk)) == ["filler", "model.keras"]


def test_leftovers_are_only_the_targets_temporary_files(tmp_path):
    target = tmp_path / "cache.h5"
    mine, other = (
        atomic_write.temporary_path(target),
        atomic_write.temporary_path(tmp_path / "x.h5"),
    )
    for path in (mine, other, tmp_path / "cache.h5", tmp_path / "00000001.npz"):
        path.write_bytes(b"")
    assert mine.name.startswith(".cache.tmp-") and mine.suffix == ".h5"
    assert atomic_write.leftovers(tmp_path, target) == [mine]
    assert atomic_write.leftovers(tmp_path) == sorted([mine, other])
    assert atomic_write.is_temporary(mine) and not atomic_write.is_temporary(target)


def test_the_current_folder_or_one_above_it_is_refused(tmp_path, monkeypatch):
    work = tmp_path / "project" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for bad in (".", "..", str(tmp_path)):
        with pytest.raises(RetrainError, match="holds the current folder"):
            with output_folder.staged(bad):
                pass
    with output_folder.staged("out") as folder:  # relative to the current folder
        write_run(folder.staging, 1)
    assert sorted(os.listdir(work)) == [".out.lock", "out"]
