"""Nothing of anyone's is lost in or beside the output folder (issue 21, "Data loss").

On real folders: a folder is retrain's only by its marker; whatever a run did
not write is carried over, never deleted; leftovers of killed runs are matched
by exact name and owner; the two-rename swap puts the old folder back when it
fails at any step; mount points are refused up front; EBUSY/EXDEV at the swap
name their cause; --cache_only and shard runs leave output_dir alone.
"""

import errno
import os
import subprocess

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrain import cli
from retrain.errors import RetrainError
from retrain.files import atomic_write, output_folder, run_marker


def run_into(out, number, extra=()):
    """One complete run into `out` through the module: settings.yaml, model.keras,
    summaries/events and `extra` files, all tagged with `number`. Returns its OutputFolder."""
    with output_folder.staged(out) as folder:
        (folder.staging / "settings.yaml").write_text(f"run: {number}\n")
        (folder.staging / "model.keras").write_bytes(bytes([number]) * 100)
        (folder.staging / "summaries").mkdir()
        (folder.staging / "summaries" / "events").write_text(str(number))
        for name in extra:
            (folder.staging / name).write_text(str(number))
    return folder


def contents(folder):
    """{relative path: bytes} of every file below folder (symlinks as their target text)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            found[key] = (
                f"-> {os.readlink(path)}".encode()
                if os.path.islink(path)
                else open(path, "rb").read()
            )
    return found


def dead_pid():
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# The folder rule: a marker of retrain's, other files carried over.


def test_the_issue_repro_a_settings_yaml_does_not_make_a_folder_retrains(tmp_path):
    p = tmp_path / "p"
    p.mkdir()
    (p / "settings.yaml").write_text("x\n")
    (p / "keep.txt").write_text("precious\n")
    entered = []
    with pytest.raises(
        RetrainError,
        match=r"holds files but no \.retrain-run\.json .*'keep\.txt'"
        r".*Move those files away",
    ):
        with output_folder.staged(p):
            entered.append(True)
    assert not entered, "the run started before refusing"
    assert contents(p) == {"settings.yaml": b"x\n", "keep.txt": b"precious\n"}
    assert sorted(os.listdir(tmp_path)) == [".p.lock", "p"]


@pytest.mark.parametrize("planted", ["fifo", "symlink", "other tool", "not json", "bad run id"])
def test_a_planted_or_foreign_marker_does_not_count(tmp_path, planted):
    out = tmp_path / "out"
    run_into(tmp_path / "real", 1)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    marker = out / run_marker.MARKER
    if planted == "fifo":
        os.mkfifo(marker)  # opened without blocking: no hang
    elif planted == "symlink":
        marker.symlink_to(tmp_path / "real" / run_marker.MARKER)
    else:
        marker.write_text(
            {
                "other tool": '{"tool": "hydra", "format": 1, "run_id": "%s", '
                '"files": []}' % ("a" * 32),
                "not json": "{",
                "bad run id": '{"tool": "retrain", "format": 1, "run_id": "x", "files": []}',
            }[planted]
        )
    with pytest.raises(RetrainError, match="no .retrain-run.json"):
        with output_folder.staged(out):
            pass
    assert (out / "notes.txt").read_text() == "mine"


def test_files_a_run_did_not_write_are_carried_into_the_new_folder(tmp_path):
    out = tmp_path / "out"
    first = run_into(out, 1, extra=["report.html"])
    (out / "notes.txt").write_text("mine")  # beside the run's files
    (out / "summaries" / "mine.txt").write_text("mine too")  # inside a folder of the run's
    (out / "plots").mkdir()  # a folder of the user's
    (out / "plots" / "a.png").write_bytes(b"png")
    (out / "link").symlink_to(tmp_path / "elsewhere")  # carried as a link, not followed
    second = run_into(out, 2)
    assert contents(out) == {
        "settings.yaml": b"run: 2\n",
        "model.keras": bytes([2]) * 100,
        "summaries/events": b"2",
        "notes.txt": b"mine",
        "summaries/mine.txt": b"mine too",
        "plots/a.png": b"png",
        "link": f"-> {tmp_path / 'elsewhere'}".encode(),
        run_marker.MARKER: (out / run_marker.MARKER).read_bytes(),
    }
    assert "report.html" not in os.listdir(out), "run 1's own file was kept"
    marker = run_marker.read_marker(out)
    assert marker.run_id == second.run_id != first.run_id
    assert "notes.txt" not in marker.files, "a carried file was taken for the run's"
    run_into(out, 3)  # and the next run carries them again
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots" / "a.png").exists()


def test_names_that_are_not_utf8_are_the_runs_own_next_time(tmp_path):
    out = tmp_path / "out"
    name = os.fsdecode(b"caf\xe9.png")  # e.g. a thumbnail of a Latin-1 file name
    run_into(out, 1, extra=[name])
    assert name in run_marker.read_marker(out).files
    run_into(out, 2)
    assert sorted(contents(out)) == [
        run_marker.MARKER,
        "model.keras",
        "settings.yaml",
        "summaries/events",
    ]


def test_a_users_file_at_a_name_the_new_run_writes_is_kept_under_another_name(tmp_path, caplog):
    out = tmp_path / "out"
    run_into(out, 1)  # without report.html
    (out / "report.html").write_text("the user's page")  # e.g. rebuilt later by hand
    second = run_into(out, 2, extra=["report.html"])
    kept = f"report.kept-{second.run_id[:8]}.html"
    assert (out / "report.html").read_text() == "2"
    assert (out / kept).read_text() == "the user's page"
    assert any(kept in record.getMessage() for record in caplog.records)


def test_files_added_during_the_run_are_carried_over(tmp_path):
    """The folder is looked at again at the swap: a new folder filled meanwhile loses nothing."""
    out = tmp_path / "out"
    with output_folder.staged(out) as folder:
        (folder.staging / "model.keras").write_bytes(b"new")
        out.mkdir()
        (out / "arrived.txt").write_text("during the run")
    assert contents(out)["arrived.txt"] == b"during the run"
    assert contents(out)["model.keras"] == b"new"


def test_output_dir_through_a_symlink_swaps_the_real_folder(tmp_path):
    real, link = tmp_path / "disk" / "out", tmp_path / "out"
    run_into(real, 1)
    link.symlink_to(real)
    folder = run_into(link, 2)
    assert folder.final == real and link.is_symlink() and os.readlink(link) == str(real)
    assert contents(link)["settings.yaml"] == b"run: 2\n"
    assert sorted(os.listdir(real.parent)) == [".out.lock", "out"]


def test_output_dir_moved_during_the_run_is_refused_at_the_swap(tmp_path):
    elsewhere, link = tmp_path / "elsewhere", tmp_path / "out"
    run_into(tmp_path / "first", 1)
    link.symlink_to(tmp_path / "first")
    elsewhere.mkdir()
    (elsewhere / "thesis.tex").write_text("months of work")
    with pytest.raises(RetrainError, match="was changed during the run"):
        with output_folder.staged(link) as folder:
            (folder.staging / "model.keras").write_bytes(b"new")
            link.unlink()
            link.symlink_to(elsewhere)
    assert contents(elsewhere) == {"thesis.tex": b"months of work"}
    assert contents(tmp_path / "first")["settings.yaml"] == b"run: 1\n"


# Leftovers of killed runs: exact names, dead owners, our marker.


def test_staging_folders_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    killed = tmp_path / f".out.staging-{dead_pid()}"
    killed.mkdir()
    run_marker.write_marker(killed, "0" * 32, None)  # what a run writes first
    (killed / "model.keras").write_bytes(b"half")
    run_into(out, 1)
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


def test_leftover_clean_up_takes_no_glob_metacharacters_from_the_name(tmp_path):
    other = tmp_path / f".exp1.staging-{dead_pid()}"  # `exp?` as a glob matches it
    other.mkdir()
    run_marker.write_marker(other, "0" * 32, None)
    (other / "model.keras").write_bytes(b"exp1's run")
    for name in ("exp?", "exp*", "exp[0-9]"):
        run_into(tmp_path / name, 1)
    assert (other / "model.keras").read_bytes() == b"exp1's run"


def test_leftover_clean_up_never_touches_a_users_folder(tmp_path):
    out, user = tmp_path / "out", tmp_path / "user"
    user.mkdir()
    (user / "data.csv").write_text("mine")
    alive = tmp_path / f".out.staging-{os.getppid()}"  # its owner runs
    unmarked = tmp_path / f".out.staging-{dead_pid()}"  # no marker: not ours
    for folder in (
        alive,
        unmarked,
        tmp_path / ".out.staging-notapid",
        tmp_path / ".out.staging-12 ",
    ):
        folder.mkdir()
        (folder / "data.csv").write_text("mine")
    run_marker.write_marker(alive, "0" * 32, None)
    (tmp_path / f".out.staging-{dead_pid()}").symlink_to(user)  # a symlink is never followed
    run_into(out, 1)
    for folder in (
        alive,
        unmarked,
        tmp_path / ".out.staging-notapid",
        tmp_path / ".out.staging-12 ",
        user,
    ):
        assert (folder / "data.csv").read_text() == "mine", folder


def test_a_killed_runs_old_folder_gives_its_foreign_files_back(tmp_path):
    """Killed after the swap, before emptying the old folder: the next run carries them over."""
    out = tmp_path / "out"
    first = run_into(out, 1)
    (out / "notes.txt").write_text("mine")
    run_into(tmp_path / "second", 2)
    left = tmp_path / f".out.staging-{dead_pid()}"
    os.rename(out, left)  # the state right after an exchange: old folder at the staging name
    os.rename(tmp_path / "second", out)
    assert run_marker.read_marker(left).run_id == first.run_id
    run_into(out, 3)
    assert contents(out)["notes.txt"] == b"mine" and not left.exists()


# The two-rename swap, failing at each step.


@pytest.fixture
def renames_failing(monkeypatch):
    """fail(*steps): from now on the steps-th os.rename calls (1-based) raise EIO."""
    monkeypatch.setattr(atomic_write, "_exchange", lambda first, second: False)
    real_rename = os.rename

    def fail(*steps):
        calls = []

        def rename(source, destination):
            calls.append(source)
            if len(calls) in steps:
                raise OSError(errno.EIO, "Input/output error", str(source))
            return real_rename(source, destination)

        monkeypatch.setattr(os, "rename", rename)

    return fail


@pytest.mark.parametrize("steps", [(1,), (2,)])
def test_a_failed_rename_of_the_two_leaves_the_previous_folder(tmp_path, renames_failing, steps):
    out = tmp_path / "out"
    run_into(out, 1)
    before = contents(out)
    with pytest.raises(RetrainError, match="Input/output error.*previous outputs in .* unchanged"):
        with output_folder.staged(out) as folder:
            (folder.staging / "model.keras").write_bytes(b"new")
            renames_failing(*steps)
    assert contents(out) == before
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


def test_the_swap_is_done_after_two_renames(tmp_path, renames_failing):
    """No third rename (the old folder back to the staging name) that could fail after the
    new run is in place: the old folder is emptied where it is."""
    out = tmp_path / "out"
    run_into(out, 1)
    renames_failing(3, 4, 5)
    run_into(out, 2)
    assert contents(out)["settings.yaml"] == b"run: 2\n"
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


def test_a_failed_put_back_says_where_the_folder_is_and_the_next_run_restores_it(
    tmp_path, renames_failing, monkeypatch
):
    out = tmp_path / "out"
    run_into(out, 1)
    before = contents(out)
    with pytest.raises(
        RetrainError,
        match=r"could not be put back and is now at \S*"
        rf"\.out\.previous-{os.getpid()}",
    ) as raised:
        with output_folder.staged(out) as folder:
            (folder.staging / "model.keras").write_bytes(b"new")
            renames_failing(2, 3)
    assert "\n" not in str(raised.value) and not out.exists()
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):  # the next run, even one that fails, puts it back
        with output_folder.staged(out):
            raise KeyboardInterrupt
    assert contents(out) == before
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]


# Mount points and EBUSY / EXDEV.


def test_a_mount_point_is_refused_before_any_work_and_a_sub_folder_works(small_mount):
    disk = small_mount("1m")
    entered = []
    with pytest.raises(
        RetrainError,
        match=f"{disk} is a mount point.*use a sub-folder of it, e.g. --output_dir {disk}/retrain",
    ):
        with output_folder.staged(disk):
            entered.append(True)
    assert not entered
    run_into(disk / "retrain", 1)
    assert contents(disk / "retrain")["settings.yaml"] == b"run: 1\n"


def test_a_folder_mounted_during_the_run_is_refused_at_the_swap(tmp_path, small_mount):
    out = tmp_path / "small"
    with pytest.raises(RetrainError, match="is a mount point"):
        with output_folder.staged(out) as folder:
            (folder.staging / "model.keras").write_bytes(b"new")
            small_mount("1m", name="small")
    assert os.listdir(out) == [] and sorted(os.listdir(tmp_path)) == [".small.lock", "small"]


@pytest.mark.parametrize(
    "code, words", [(errno.EBUSY, "busy (a mount point"), (errno.EXDEV, "another file system")]
)
def test_busy_or_cross_device_at_the_swap_names_the_cause(tmp_path, monkeypatch, code, words):
    out = tmp_path / "out"
    run_into(out, 1)
    before = contents(out)

    def refuse(first, second):
        raise OSError(code, os.strerror(code), str(second))

    monkeypatch.setattr(atomic_write, "_exchange", refuse)
    with pytest.raises(RetrainError) as raised:
        run_into(out, 2)
    assert words in str(raised.value) and "free space" not in str(raised.value)
    assert contents(out) == before


# --cache_only and shard runs.


def write_photos(root, per_class=3):
    """Small real photo crops, one photo per class."""
    for name, pixels in (("cat", data.chelsea()), ("coffee", data.coffee())):
        (root / name).mkdir(parents=True)
        for number in range(per_class):
            crop = pixels[number * 20 : number * 20 + 200, number * 30 : number * 30 + 240]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / name / f"{number}.jpg")
    return root


@pytest.mark.parametrize("shards", [[], ["--num_shards", "2", "--shard_index", "1"]])
def test_cache_only_and_shard_runs_leave_the_output_folder_byte_for_byte(tmp_path, capsys, shards):
    photos = write_photos(tmp_path / "photos")
    out = tmp_path / "out"
    run_into(out, 1, extra=["labels.txt", "report.html"])
    before, beside = contents(out), sorted(os.listdir(tmp_path))
    status = cli.main(
        [
            "--image_dir",
            str(photos),
            "--bottleneck_dir",
            str(tmp_path / "cache"),
            "--output_dir",
            str(out),
            "--cache_only",
            *shards,
            "--extraction_batch_size",
            "4",
        ]
    )
    assert status == 0, capsys.readouterr().err
    assert contents(out) == before
    assert sorted(os.listdir(tmp_path)) == sorted([*beside, "cache"])
    if not shards:
        assert "extracted" in capsys.readouterr().out


def test_the_command_refuses_a_folder_it_did_not_write_before_any_work(tmp_path, capsys):
    photos, cache, p = write_photos(tmp_path / "photos"), tmp_path / "cache", tmp_path / "p"
    p.mkdir()
    (p / "settings.yaml").write_text("x\n")
    (p / "keep.txt").write_text("precious\n")
    status = cli.main(
        ["--image_dir", str(photos), "--bottleneck_dir", str(cache), "--output_dir", str(p)]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.startswith("retrain: ")]
    assert status == 2 and len(lines) == 1 and "keep.txt" in lines[0] and "Traceback" not in err
    assert not cache.exists(), "work started before the refusal"
    assert contents(p) == {"settings.yaml": b"x\n", "keep.txt": b"precious\n"}
    assert sorted(os.listdir(tmp_path)) == [".p.lock", "p", "photos"]
