"""Atomic file writing, the one way every hpcaccel output is written (run outputs,
checkpoints, packed HDF5 files, shard indexes).

A reader, or a process killed mid-write, sees the old file or the new one, never a torn
one. New files get the permissions open() would give them (0666 less the umask), so on
shared scratch team-mates can read packed data and results when the umask allows it;
tempfile.mkstemp would create every file 0600.
"""
from __future__ import annotations

import contextlib
import os
import secrets


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a new empty temporary file's path next to `path`. When the block ends without
    an exception, the file is fsynced and renamed over `path` and the directory fsynced
    (the rename itself durable); on an exception it is removed and `path` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    while True:  # a random name, created exclusively: concurrent writers never share one
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(6)}-{os.path.basename(path)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode & ~umask
            break
        except FileExistsError:
            continue
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str, write) -> None:
    """Atomically replace `path` with what write(binary file handle) writes."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            write(fh)

