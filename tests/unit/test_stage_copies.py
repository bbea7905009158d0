"""Copies in a stage directory (--stage-dir): a copy superseded by a change of its data is
removed, unless a live run (another process holding the copy's lock) still reads it; a run
that died holds nothing; copies of other data, current copies and copies without a source
record stay. Real files, real processes and real flock locks."""
import json
import os
import signal
import subprocess
import sys

from hpcaccel.data import copies

HOLDER = ("import json, sys; from hpcaccel.data import copies; "
          "copies.hold(sys.argv[1], json.loads(sys.argv[2])); print('held', flush=True); "
          "sys.stdin.read()")


def a_run_holding(directory, record):
    """Another process that claims copy `directory` as a run does, and holds it."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, directory, json.dumps(record)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def sources(tmp_path, sizes=(100, 200)):
    files = []
    for i, n in enumerate(sizes):
        path = tmp_path / "src" / f"part-{i}.h5"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * n)
        files.append(str(path))
    return files


def test_a_superseded_copy_is_removed_once_no_live_run_holds_it(tmp_path):
    files = sources(tmp_path)
    stage = str(tmp_path / "stage")
    old = copies.source_record(files)
    old_dir = copies.copy_dir(stage, old)
    holder = a_run_holding(old_dir, old)
    try:
        with open(os.path.join(old_dir, "00000-part-0.h5"), "wb") as fh:  # its copied data
            fh.write(b"x" * 100)
        with open(files[1], "ab") as fh:  # a shard changes: a new version, a new copy
            fh.write(b"y")
        new = copies.source_record(files)
        assert copies.copy_dir(stage, new) != old_dir
        assert copies.remove_superseded(stage, new) == {"removed": 0, "bytes": 0, "in_use": 1}
        assert os.path.isdir(old_dir)  # the live run still reads it
    finally:
        holder.send_signal(signal.SIGKILL)  # a run that dies: the kernel drops its lock
        holder.wait()
    freed = copies.remove_superseded(stage, new)
    assert freed["removed"] == 1 and freed["in_use"] == 0 and freed["bytes"] >= 100
    assert os.listdir(stage) == []  # nothing left over, not even the renamed copy


def test_other_data_current_copies_and_unrecorded_copies_stay(tmp_path):
    files = sources(tmp_path)
    stage = tmp_path / "stage"
    record = copies.source_record(files)
    # a copy of the first file alone, still current: another dataset's valid copy
    subset = copies.source_record(files[:1])
    copies.hold(copies.copy_dir(str(stage), subset), subset)
    # a stale copy of other files
    other = [[str(tmp_path / "elsewhere.h5"), 5, 1]]
    (stage / "hpcaccel-0123456789abcdef").mkdir()
    (stage / "hpcaccel-0123456789abcdef" / copies.SOURCE).write_text(json.dumps({"files": other}))
    # a copy made before copies had a record, and something else entirely
    (stage / "hpcaccel-fedcba9876543210").mkdir()
    (stage / "mine").mkdir()
    before = sorted(os.listdir(stage))
    assert copies.remove_superseded(str(stage), record) == {"removed": 0, "bytes": 0, "in_use": 0}
    assert sorted(os.listdir(stage)) == before


CLEANER = ("import fcntl, os, sys; d = sys.argv[1]; fd = os.open(os.path.join(d, '.hpcaccel-lock'), "
           "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
           "sys.stdin.readline(); os.rename(d, d + '-removing')")


def test_a_run_claiming_a_copy_while_it_is_removed_makes_it_anew(tmp_path):
    """A claim that waited for a cleaner's exclusive lock finds the lock file renamed away
    with the copy, and makes the copy again instead of using the one being deleted."""
    import threading
    import time

    files = sources(tmp_path)
    stage = str(tmp_path / "stage")
    record = copies.source_record(files)
    directory = copies.copy_dir(stage, record)
    os.makedirs(directory)
    cleaner = subprocess.Popen([sys.executable, "-c", CLEANER, directory], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert cleaner.stdout.readline().strip() == "locked"
    claim = threading.Thread(target=copies.hold, args=(directory, record))
    claim.start()
    time.sleep(0.5)  # the claim waits for the shared lock
    cleaner.stdin.write("go\n")
    cleaner.stdin.close()
    assert cleaner.wait(30) == 0
    claim.join(30)
    lock = os.path.join(directory, copies.LOCK)
    assert os.path.samestat(os.fstat(copies._held[directory]), os.stat(lock))  # the new copy's
    assert os.path.isdir(directory + "-removing") and os.path.isdir(directory)
    assert json.loads(open(os.path.join(directory, copies.SOURCE)).read())["files"] == record
