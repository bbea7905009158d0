"""The one atomic write: complete files or none, permissions from the umask."""
import os

import pytest

from hpcaccel.fsutil import atomic_write


@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_new_files_get_the_permissions_open_would_give(tmp_path, umask, mask):
    umask(mask)
    atomic_write(str(tmp_path / "out" / "summary.json"), lambda fh: fh.write(b"{}"))
    path = tmp_path / "out" / "summary.json"
    assert path.read_bytes() == b"{}"
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
    with open(tmp_path / "plain", "w"):
        pass
    assert os.stat(path).st_mode == os.stat(tmp_path / "plain").st_mode


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "model.pt"
    atomic_write(str(path), lambda fh: fh.write(b"old"))

    def fails(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(str(path), fails)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.pt"]
