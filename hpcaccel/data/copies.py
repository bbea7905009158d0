"""Copies in a stage directory (--stage-dir): what each copy is of, which runs use it, and
removing the copies that a change of the data has superseded.

A copy is the directory STAGE/hpcaccel-TAG/, TAG naming the version of the data (every
file's path, size and modification time). Each copy holds two files beside the data:

  .hpcaccel-source.json  the (path, size, mtime_ns) of every file it is a copy of;
  .hpcaccel-lock         every process staging into or reading from the copy (one per host
                         and run: the copier) holds a shared flock on it until it exits. The
                         kernel drops the lock of a process that dies, so a crashed run
                         leaves no stale lock behind.

A copy is superseded when one of its files has changed or gone since (no later run can
pick its TAG again). A run removes the superseded copies of its own data (those sharing a
source path with it) that no live run holds: it takes the lock exclusively without
waiting, renames the copy out of the way while holding it, then deletes it. A run that
still reads an old copy keeps it; the next run after it ends removes it. Copies without a
source record (made before there was one) and copies of other data are left alone.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil

from ..fsutil import atomic_write

SOURCE = ".hpcaccel-source.json"
LOCK = ".hpcaccel-lock"
PREFIX = "hpcaccel-"
REMOVING = ".hpcaccel-removing-"  # a superseded copy being deleted (renamed first)

_held: dict[str, int] = {}  # copy directory -> the descriptor holding its shared lock


def source_record(files) -> list:
    """[path, size, mtime_ns] of each file (absolute paths): the version of the data."""
    record = []
    for p in files:
        st = os.stat(p)
        record.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return record


def record_tag(record) -> str:
    """The copy's name for this version of the data."""
    h = hashlib.sha256()
    for path, size, mtime_ns in record:
        h.update(f"{path}\0{size}\0{mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def copy_dir(stage_dir: str, record) -> str:
    return os.path.join(stage_dir, PREFIX + record_tag(record))


def hold(directory: str, record) -> None:
    """Make `directory` (a copy of the data `record` describes) and hold its shared lock
    until this process exits; write its source record. Retried if a concurrent cleaner
    removed the directory between its creation and the lock."""
    if directory in _held:
        return
    for _ in range(20):
        os.makedirs(directory, exist_ok=True)
        lock = os.path.join(directory, LOCK)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # renamed away by a cleaner: make it anew
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)  # a cleaner holds it exclusively only while renaming
        if _still_there(fd, lock):
            _held[directory] = fd
            break
        os.close(fd)
    else:
        raise OSError(f"{directory}: removed again and again while being claimed")
    path = os.path.join(directory, SOURCE)
    if not os.path.exists(path):
        data = json.dumps({"files": record}).encode()
        atomic_write(path, lambda fh: fh.write(data))


def remove_superseded(stage_dir: str, record) -> dict:
    """Remove the superseded copies of this data under `stage_dir` that no live run holds.
    Never fails: a copy that cannot be removed (another user's, a race) stays. Returns
    {"removed": copies, "bytes": freed, "in_use": superseded copies a live run holds}."""
    result = {"removed": 0, "bytes": 0, "in_use": 0}
    ours = {path for path, _, _ in record}
    try:
        names = os.listdir(stage_dir)
    except OSError:
        return result
    for name in names:
        directory = os.path.join(stage_dir, name)
        if name.startswith(REMOVING):  # a removal that was interrupted: finish it
            shutil.rmtree(directory, ignore_errors=True)
            continue
        if not name.startswith(PREFIX) or directory in _held:
            continue
        try:
            with open(os.path.join(directory, SOURCE)) as fh:
                theirs = json.load(fh)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a copy with a record: leave it
        if not ours & {path for path, _, _ in theirs} or _current(theirs):
            continue
        freed = _remove_unless_held(stage_dir, name)
        if freed is None:
            result["in_use"] += 1
        elif freed:
            result["removed"] += 1
            result["bytes"] += freed
    return result


def _current(record) -> bool:
    """Whether every file of `record` is still as it was when copied."""
    try:
        return source_record(path for path, _, _ in record) == [list(r) for r in record]
    except OSError:
        return False


def _remove_unless_held(stage_dir: str, name: str):
    """Bytes freed by removing copy `name`; None if a live run holds it; 0 if it could not
    be removed (not ours, or another cleaner got there first)."""
    directory = os.path.join(stage_dir, name)
    lock = os.path.join(directory, LOCK)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        if not _still_there(fd, lock):
            return 0
        size = _size(directory)
        trash = os.path.join(stage_dir, f"{REMOVING}{name}-{os.getpid()}")
        os.rename(directory, trash)  # a run claiming the copy from now on makes a new one
    except OSError:
        return 0
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return size


def _still_there(fd: int, path: str) -> bool:
    """Whether the open lock file `fd` is still the one at `path` (not renamed away)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _size(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
