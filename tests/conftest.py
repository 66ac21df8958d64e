"""Shared test set-up: an isolated RETRAIN_HOME for the whole session, small mounts."""

import os
import subprocess
from pathlib import Path

import pytest


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
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
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
