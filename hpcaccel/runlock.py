"""OUT/run.lock: one live run per output directory (see Lock), and who holds it.

A crashed run's lock is taken over (stale_reason says when); `in_use` tells the doctor
what Lock.acquire would refuse.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from .errors import UsageError

LOCK = "run.lock"
HEARTBEAT_S = 30.0
# A lock from another host is taken over once its heartbeat is this old (its holder's pid
# cannot be checked from here). HPCACCEL_LOCK_STALE_S overrides.
STALE_AFTER_S = 600.0
# Locks this process holds: released at exit, and by release_held() before MPI_Abort (which
# ends the process without running exit handlers).
_HELD: list = []


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
    gone, or on another host and the heartbeat is older than STALE_AFTER_S, or an earlier
    launch of the training step by the elastic batch script within the same job run."""

    path: str
    token: str
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def acquire(cls, out: str, info=print) -> "Lock":
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:  # a file there, a path the file system refuses (/proc/x)
            raise UsageError(f"--out {out}: cannot create it ({e.strerror or e})") from None
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
                    raise UsageError(_in_use(out, holder, path)) from None
                if _break(path, raw):
                    info(f"hpcaccel: --out {out}: took over the lock of a run that is gone "
                         f"({why})")
                continue
            except OSError as e:
                raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None
            try:
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            lock = cls(path, token)
            lock._start_heartbeat()
            _HELD.append(lock)
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
        if self in _HELD:
            _HELD.remove(self)
        holder, _ = _read_lock(self.path)
        if holder and holder.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def release_held() -> None:
    """Release every lock this process holds (before MPI_Abort). Idempotent."""
    for lock in list(_HELD):
        lock.release()


def in_use(out: str) -> str | None:
    """Why OUT is in use: its lock's holder while it may still run (see Lock); None if no
    live run holds it."""
    path = os.path.join(out, LOCK)
    if not os.path.isdir(out):
        return None
    holder, raw = _read_lock(path)
    if raw is None or stale_reason(holder, path) is not None:
        return None
    return _in_use(out, holder, path)


def _in_use(out: str, holder: dict, path: str) -> str:
    return (f"--out {out}: in use by a running hpcaccel run ({describe_holder(holder, path)}); "
            f"wait for it to end or use another --out")


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
    """The Slurm job, its restart count and (elastic template) which launch of the training
    step within this run of the job (HPCACCEL_LAUNCH, counted by the batch script)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    launch = os.environ.get("HPCACCEL_LAUNCH")
    return {"slurm_job": job, "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            **({"slurm_launch": launch} if launch else {})}


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
    if (mine.get("slurm_launch") and holder.get("slurm_job") == mine["slurm_job"]
            and holder.get("slurm_launch") not in (None, mine["slurm_launch"])):
        # the elastic batch script relaunches only after the earlier step has ended, whose
        # rank 0 may have been on a node that is gone
        return (f"{describe_holder(holder, path)}: an earlier launch of this Slurm job "
                f"{mine['slurm_job']} (launch {holder.get('slurm_launch')}, now "
                f"{mine['slurm_launch']})")
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
