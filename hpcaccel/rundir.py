"""One run per output directory: who owns --out, and whether this start continues it.

OUT/run.json records the run that owns the directory: a run id, and what makes a resume
valid (model fingerprint digest, data, global batch) plus its epochs. Checkpoints carry the
same record (checkpoint.save copies it in), so `--resume auto` takes only this run's own
checkpoints. OUT/run.lock is held while a run is running; see Lock.

Decisions at start-up (rank 0, after every flag and file was checked), by --resume:
  none  OUT holds no run outputs -> a new run. Otherwise exit 2, unless --overwrite: the
        old outputs move to OUT/previous/<run id>/ (nothing is deleted), then a new run.
  auto  no outputs -> a new run; outputs of a run this one matches -> continue from its
        newest checkpoint, or "already complete" when it has trained --epochs epochs;
        outputs of another run -> exit 2 naming the difference (or --overwrite, as above).
  PATH  the checkpoint must match the model, data and global batch; OUT must be empty or
        hold the checkpoint's own run (or --overwrite).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from . import checkpoint
from .errors import UsageError
from .fsutil import atomic_write

RECORD = "run.json"
LOCK = "run.lock"
OUTPUTS = (RECORD, "summary.json", "metrics.jsonl", "model.pt", "checkpoints")
HEARTBEAT_S = 30.0
# A lock from another host is taken over once its heartbeat is this old (its holder's pid
# cannot be checked from here). HPCACCEL_LOCK_STALE_S overrides.
STALE_AFTER_S = 600.0


# -- identity ------------------------------------------------------------------------------
def model_digest(fingerprint: list) -> str:
    return hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:16]


def data_identity(ds) -> dict:
    """What identifies the training data wherever it lies (a copy on node-local scratch is
    the same data): sample count, shape, classes and a digest of the first samples, taken
    when the data's metadata was read (data/hdf5.py), so identifying it opens no file."""
    return {"samples": int(ds.samples), "sample_shape": list(ds.sample_shape),
            "classes": int(ds.classes), "head": ds.head}


def identity(model, train_ds, global_batch: int, epochs: int) -> dict:
    """This start's identity; compared with a run record by `mismatch`."""
    return {"model": model_digest(checkpoint.fingerprint(model)), "data": data_identity(train_ds),
            "global_batch": int(global_batch), "epochs": int(epochs)}


def mismatch(record: dict, mine: dict) -> str | None:
    """Why a run with `record` cannot be continued by a start with identity `mine`; None if
    it can (epochs may differ: a larger --epochs extends the run)."""
    if record.get("model") != mine["model"]:
        return "it trained a different model (parameter names or shapes differ)"
    theirs, data = record.get("data") or {}, mine["data"]
    for key, what in (("samples", "samples"), ("sample_shape", "sample shape"),
                      ("classes", "classes"), ("head", "first samples")):
        if theirs.get(key) != data[key]:
            return (f"it trained on other data ({what} {theirs.get(key)}, this data's "
                    f"{data[key]})")
    if record.get("global_batch") != mine["global_batch"]:
        return (f"its global batch was {record.get('global_batch')}, this run's is "
                f"{mine['global_batch']} (ranks x --batch-size)")
    return None


def read_record(out: str) -> dict | None:
    try:
        with open(os.path.join(out, RECORD)) as fh:
            record = json.load(fh)
        return record if isinstance(record, dict) and "run_id" in record else None
    except (OSError, ValueError):
        return None


def write_record(out: str, record: dict) -> None:
    data = (json.dumps(record, indent=1) + "\n").encode()
    atomic_write(os.path.join(out, RECORD), lambda fh: fh.write(data))


def outputs_in(out: str) -> list[str]:
    """Run outputs present in `out` (an empty checkpoints/ does not count)."""
    found = [n for n in OUTPUTS if n != "checkpoints" and os.path.exists(os.path.join(out, n))]
    if checkpoint.list_checkpoints(out):
        found.append("checkpoints")
    return found


# -- the lock ------------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


@dataclass
class Lock:
    """OUT/run.lock: created with O_CREAT|O_EXCL (atomic on local file systems, NFSv3+ and
    Lustre), holding host, pid, the pid's start time and the Slurm job id and restart count;
    rank 0 refreshes its mtime every HEARTBEAT_S seconds. A lock is stale when its holder is
    an earlier run (restart) of this same Slurm job, or on this host and its process is
    gone, or on another host and the heartbeat is older than STALE_AFTER_S."""

    path: str
    token: str
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def acquire(cls, out: str, info=print) -> "Lock":
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, LOCK)
        token = uuid.uuid4().hex
        content = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "pid_start": _proc_start(os.getpid()), "token": token,
                              "since": time.time(), **_slurm_job()}).encode()
        for _ in range(5):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder, raw = _read_lock(path)
                if raw is None:
                    continue  # released meanwhile
                why = stale_reason(holder, path)
                if why is None:
                    raise UsageError(f"--out {out}: in use by a running hpcaccel run "
                                     f"({describe_holder(holder, path)}); wait for it to end "
                                     f"or use another --out")
                if _break(path, raw):
                    info(f"hpcaccel: --out {out}: took over the lock of a run that is gone "
                         f"({why})")
                continue
            try:
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            lock = cls(path, token)
            lock._start_heartbeat()
            atexit.register(lock.release)
            return lock
        raise UsageError(f"--out {out}: could not take {path} (other runs keep starting on it)")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass
        threading.Thread(target=beat, daemon=True, name="hpcaccel-lock-heartbeat").start()

    def release(self) -> None:
        """Remove the lock if it is still ours. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        holder, _ = _read_lock(self.path)
        if holder and holder.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _read_lock(path: str):
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(raw)
        return (holder if isinstance(holder, dict) else {}), raw
    except ValueError:
        return {}, raw


def _age(path: str) -> float | None:
    try:
        return max(0.0, time.time() - os.stat(path).st_mtime)
    except OSError:
        return None


def describe_holder(holder: dict, path: str) -> str:
    age = _age(path)
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
            + (f", heartbeat {age:.0f} s ago" if age is not None else ""))


def _slurm_job() -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job, "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0")} if job else {}


def stale_reason(holder: dict, path: str) -> str | None:
    """Why the lock's holder is gone; None while it may be running."""
    limit = float(os.environ.get("HPCACCEL_LOCK_STALE_S", STALE_AFTER_S))
    age = _age(path) or 0.0
    mine = _slurm_job()
    if (mine and holder.get("slurm_job") == mine["slurm_job"]
            and holder.get("slurm_restart") != mine["slurm_restart"]):
        # a requeued job (its earlier run killed, maybe with its node) may start on another
        # node at once; an earlier run of the same job cannot still be running
        return (f"{describe_holder(holder, path)}: an earlier run of this Slurm job "
                f"{mine['slurm_job']} (restart {holder.get('slurm_restart')}, now "
                f"{mine['slurm_restart']})")
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _alive(holder["pid"], holder.get("pid_start")):
            return f"host {holder['host']}, pid {holder['pid']}: no such process"
        return None
    if age > limit:
        return (f"{describe_holder(holder, path)}: no heartbeat for more than {limit:.0f} s "
                f"(HPCACCEL_LOCK_STALE_S)")
    return None


def _break(path: str, raw: bytes) -> bool:
    """Move a stale lock aside; False if another starter replaced it meanwhile."""
    aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    _, moved = _read_lock(aside)
    if moved != raw:  # a racing starter's fresh lock: put it back if nobody took the place
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        os.unlink(aside)
        return False
    os.unlink(aside)
    return True


# -- the decision --------------------------------------------------------------------------
@dataclass
class Claim:
    """What rank 0 decided; `lock` on rank 0 only (None in the broadcast copy)."""
    run_id: str
    checkpoint: str | None = None   # continue from this file; None: a new run
    complete: bool = False          # the run already trained --epochs epochs: nothing to do
    lock: Lock | None = None

    def shared(self) -> "Claim":
        return Claim(self.run_id, self.checkpoint, self.complete)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim(out: str, resume: str, overwrite: bool, mine: dict, fingerprint: list,
          info=print) -> Claim:
    """Rank 0: lock `out` and decide (see the module docstring). UsageError for a refusal;
    the lock is released again then."""
    lock = Lock.acquire(out, info)
    try:
        c = _decide(out, resume, overwrite, mine, fingerprint, info)
    except BaseException:
        lock.release()
        raise
    c.lock = lock
    return c


def _refuse(out: str, why: str, record: dict | None) -> UsageError:
    where = os.path.join(out, "previous", (record or {}).get("run_id", "<time>"))
    return UsageError(f"--out {out}: {why}; use a new --out, or --overwrite true to move its "
                      f"outputs to {where}/ and start a new run there")


def _decide(out, resume, overwrite, mine, fingerprint, info) -> Claim:
    present = outputs_in(out)
    record = read_record(out)
    if resume == "none":
        if present and not overwrite:
            what = (f"run {record['run_id']}" if record else "a run") + f" ({', '.join(present)})"
            raise UsageError(f"--out {out}: holds the outputs of {what}; to continue it pass "
                             f"--resume auto, or use a new --out, or --overwrite true to move them to "
                             f"{os.path.join(out, 'previous', (record or {}).get('run_id', '<time>'))}/"
                             f" and start a new run")
        return _new_run(out, mine, present, record, info)
    if resume == "auto":
        if not present:
            return _new_run(out, mine, present, record, info)
        if record is None:
            why = ("holds outputs without a run record (run.json: from an older hpcaccel or "
                   "another program), so --resume auto cannot tell whose they are; resume a "
                   "checkpoint explicitly with --resume PATH")
        else:
            why = mismatch(record, mine)
            why = why and f"--resume auto: run {record['run_id']} there cannot be continued: {why}"
        if why is None:
            found = checkpoint.list_checkpoints(out)
            if found:
                return _continue(out, found[-1], record, mine, fingerprint)
            if "summary.json" not in present:  # ended before its first checkpoint
                info(f"hpcaccel: run {record['run_id']} in {out} has no checkpoint yet: "
                     f"starting it again")
                write_record(out, dict(record, epochs=mine["epochs"]))
                return Claim(record["run_id"])
            why = (f"--resume auto: run {record['run_id']} there finished but its checkpoints "
                   f"are gone")
        if not overwrite:
            raise _refuse(out, why, record)
        return _new_run(out, mine, present, record, info)
    # an explicit checkpoint file
    if not os.path.exists(resume):
        raise UsageError(f"--resume {resume}: no such file")
    head = checkpoint.header(resume, fingerprint)
    theirs = head.get("run")
    why = theirs and mismatch(theirs, mine)
    if why:
        raise UsageError(f"--resume {resume}: checkpoint cannot be continued: {why}")
    if present and record is not None and theirs and record["run_id"] == theirs["run_id"]:
        return _continue(out, resume, record, mine, fingerprint, head)
    if present:
        if not overwrite:
            raise _refuse(out, "holds the outputs of another run than the checkpoint's", record)
        _move_aside(out, present, record, info)
    run = dict(theirs or {}, **mine, run_id=(theirs or {}).get("run_id") or uuid.uuid4().hex[:12])
    write_record(out, _stamp(run))
    return Claim(run["run_id"], resume)


def _continue(out, path, record, mine, fingerprint, head=None) -> Claim:
    head = head or checkpoint.header(path, fingerprint)
    theirs = head.get("run") or {}
    if theirs.get("run_id") != record["run_id"]:
        raise _refuse(out, f"--resume auto: the newest checkpoint {path} belongs to run "
                      f"{theirs.get('run_id', '(none recorded)')}, not to this directory's run "
                      f"{record['run_id']}", record)
    done = head["step_in_epoch"] == 0 and head["epoch"] >= mine["epochs"]
    complete = done and os.path.exists(os.path.join(out, "summary.json"))
    if not complete and record.get("epochs") != mine["epochs"]:
        write_record(out, dict(record, epochs=mine["epochs"]))  # extended (or shortened)
    return Claim(record["run_id"], path, complete)


def _new_run(out, mine, present, record, info) -> Claim:
    if present:
        _move_aside(out, present, record, info)
    run = _stamp(dict(mine, run_id=uuid.uuid4().hex[:12]))
    write_record(out, run)
    return Claim(run["run_id"])


def _stamp(run: dict) -> dict:
    return dict(run, host=socket.gethostname(), started=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _move_aside(out, present, record, info) -> None:
    """--overwrite: move the previous run's outputs to OUT/previous/<run id>/; nothing is
    deleted (rename within one directory tree: atomic per file, no copy)."""
    name = (record or {}).get("run_id") or time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(out, "previous", name)
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(out, "previous", f"{name}-{n}")
    os.makedirs(dest)
    for entry in present:
        shutil.move(os.path.join(out, entry), os.path.join(dest, entry))
    info(f"hpcaccel: --overwrite: moved the previous run's outputs to {dest}/")


def claim_collectively(cfg, control, model, train_ds, world_size: int, info=print) -> Claim:
    """Every rank: rank 0 claims cfg.out; the decision (not the lock) reaches all ranks.
    A refusal is a UsageError on every rank (exit 2, one line from rank 0)."""
    def on_main():
        if not control.is_main:
            return None
        mine = identity(model, train_ds, cfg.batch_size * world_size, cfg.epochs)
        return claim(cfg.out, cfg.resume, cfg.overwrite, mine, checkpoint.fingerprint(model), info)

    mine = control.collectively(on_main)
    shared = control.broadcast(mine.shared() if mine is not None else None)
    shared.lock = mine.lock if mine is not None else None
    return shared
