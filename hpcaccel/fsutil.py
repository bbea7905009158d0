"""File-system helpers shared by every writer of run outputs."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, write) -> None:
    """Write via a temp file in the same directory, fsync, rename (and fsync the directory):
    a reader, or a process killed mid-write, sees the old file or the new one, never a
    torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
