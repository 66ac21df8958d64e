"""retrain.files.regular_file: what open_regular refuses, and the reason it gives."""

import errno
import os
import socket

import pytest

from retrain.files import regular_file


def test_a_regular_file_is_yielded_with_its_status(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"12345")
    with regular_file.open_regular(path, follow_symlinks=False, limit=5) as (file, status):
        assert file.read() == b"12345" and status.st_size == 5
        assert os.get_blocking(file.fileno())
    assert file.closed


def test_a_symbolic_link_is_refused_or_followed(tmp_path):
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(regular_file.RefusedFile) as refused:
        with regular_file.open_regular(tmp_path / "link", follow_symlinks=False, limit=None):
            pytest.fail("opened")
    assert refused.value.errno == errno.ELOOP and refused.value.strerror == "a symbolic link"
    assert refused.value.filename == str(tmp_path / "link") and refused.value.status is None
    with regular_file.open_regular(tmp_path / "link", follow_symlinks=True, limit=None) as (f, _):
        assert f.read() == b"x"


@pytest.mark.parametrize("follow", [True, False])
def test_a_fifo_or_folder_is_refused_without_blocking(tmp_path, follow):
    os.mkfifo(tmp_path / "fifo")
    for name, what in (("fifo", "FIFO"), (".", "folder")):
        with pytest.raises(regular_file.RefusedFile) as refused:
            with regular_file.open_regular(tmp_path / name, follow_symlinks=follow, limit=None):
                pytest.fail("opened")
        assert refused.value.errno == errno.EINVAL
        assert refused.value.strerror == f"not a regular file ({what})"
        assert isinstance(refused.value, OSError)


def test_a_socket_fails_to_open(tmp_path):
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        with pytest.raises(OSError) as error:
            with regular_file.open_regular(tmp_path / "sock", follow_symlinks=True, limit=None):
                pytest.fail("opened")
    assert error.value.errno == errno.ENXIO


def test_a_file_over_the_limit_is_refused_unread(tmp_path):
    path = tmp_path / "big"
    with open(path, "wb") as handle:
        handle.truncate(10_001)
    with pytest.raises(regular_file.RefusedFile) as refused:
        with regular_file.open_regular(path, follow_symlinks=True, limit=10_000):
            pytest.fail("opened")
    assert refused.value.errno == errno.EFBIG and refused.value.status.st_size == 10_001
    assert refused.value.strerror == "10,001 bytes, more than the 10,000 read"


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        with regular_file.open_regular(tmp_path / "none", follow_symlinks=False, limit=None):
            pytest.fail("opened")


def test_not_regular_names_the_kind():
    assert regular_file.not_regular(0o100644) is None
    assert regular_file.not_regular(0o010644) == "not a regular file (FIFO)"
    assert regular_file.kind(0o140755) == "socket"
