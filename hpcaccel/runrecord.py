"""The record of the run that owns an output directory: OUT/run.json, and OUT/progress.json.

OUT/run.json records the run that owns the directory: a run id, and what makes a resume
valid (model fingerprint digest, data, global batch) plus its epochs. Checkpoints carry the
same record (checkpoint.save copies it in), so `--resume auto` takes only this run's own
checkpoints. Every continuation counts as a restart in it (`restarts`, and `steps_lost`:
the steps the previous start took past the checkpoint, from OUT/progress.json, which rank 0
keeps up to date while training).

Here the files are read and written and a record is compared with a start's identity
(`mismatch`); what a start does with them is rundir.py's. checkpoint.py and rundir.py both
use this module, which uses neither.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from . import elastic
from .fsutil import atomic_write

RECORD = "run.json"
PROGRESS = "progress.json"  # rank 0's last step and when (write_progress), for steps lost


# -- identity ------------------------------------------------------------------------------
def model_digest(fingerprint: list) -> str:
    return hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:16]


def data_identity(ds) -> dict:
    """What identifies the training data wherever it lies (a copy on node-local scratch is
    the same data): sample count, shape, classes and a digest of the first samples, taken
    when the data's metadata was read (data/hdf5.py), so identifying it opens no file."""
    return {"samples": int(ds.samples), "sample_shape": list(ds.sample_shape),
            "classes": int(ds.classes), "head": ds.head}


def mismatch(record: dict, mine: dict, elastic: bool = False) -> str | None:
    """Why a run with `record` cannot be continued by a start with identity `mine`; None if
    it can (epochs may differ: a larger --epochs extends the run). `elastic`: the global
    batch is checked later, against the checkpoint's world size (rundir.plan_resume)."""
    if record.get("model") != mine["model"]:
        return "it trained a different model (parameter names or shapes differ)"
    # records from before tasks hold none: those runs classified
    if mine.get("task") and record.get("task", "classify") != mine["task"]:
        return f"it trained --task {record.get('task', 'classify')}, this run --task {mine['task']}"
    theirs, data = record.get("data") or {}, mine["data"]
    for key, what in (("samples", "samples"), ("sample_shape", "sample shape"),
                      ("classes", "classes"), ("head", "first samples")) if data else ():
        if theirs.get(key) != data[key]:
            return (f"it trained on other data ({what} {theirs.get(key)}, this data's "
                    f"{data[key]})")
    if (mine["global_batch"] is not None and not elastic
            and record.get("global_batch") != mine["global_batch"]):
        return global_batch_mismatch(record, mine)
    return None


def global_batch_mismatch(record: dict, mine: dict) -> str | None:
    if mine["global_batch"] is not None and record.get("global_batch") != mine["global_batch"]:
        return (f"its global batch was {record.get('global_batch')}, this run's is "
                f"{mine['global_batch']} (ranks x --batch-size)")
    return None


# -- the files -----------------------------------------------------------------------------
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


def write_progress(out: str, progress: dict) -> None:
    """Rank 0: OUT/progress.json, the run's last step (run_id, step, epoch, time, ...), read
    by the next start to count the steps lost since the checkpoint it continues. Replaced
    by a rename, not fsynced: it is written often and a stale one only undercounts."""
    path = os.path.join(out, PROGRESS)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(progress, fh)
    os.replace(tmp, path)


class ProgressMark:
    """Rank 0's hook after every step (trainer.LoopHooks.mark): writes OUT/progress.json at
    most every `interval` seconds, so a restart knows how far the run got past its newest
    checkpoint (steps lost: up to `interval` seconds of steps go uncounted)."""

    def __init__(self, out: str, run_id: str, world_size: int, interval: float = 1.0):
        self.out, self.run_id, self.world_size = out, run_id, world_size
        self.interval, self.next = interval, 0.0

    def __call__(self, step: int, epoch: int) -> None:
        now = time.time()
        if now < self.next:
            return
        self.next = now + self.interval
        try:
            write_progress(self.out, {"run_id": self.run_id, "step": int(step),
                                      "epoch": int(epoch), "time": now,
                                      "world_size": self.world_size})
        except OSError:  # a full or flaky file system must not end the training
            pass


def read_progress(out: str) -> dict | None:
    try:
        with open(os.path.join(out, PROGRESS)) as fh:
            progress = json.load(fh)
        return progress if isinstance(progress, dict) else None
    except (OSError, ValueError):
        return None


def counted_restart(record: dict, progress: dict | None, head: dict) -> dict:
    """The run's record with one more restart from checkpoint `head`, and the steps (and
    seconds) its previous start took past that checkpoint, which this start takes again."""
    lost = elastic.lost_steps(progress, head["global_step"], record["run_id"])
    now = time.time()
    last = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
            "checkpoint_step": int(head["global_step"]), "steps_lost": lost,
            "world_size_before": (progress or {}).get("world_size"),
            "seconds_lost": (round(max(0.0, progress["time"] - head["saved"]), 1)
                             if lost and head.get("saved") else 0.0),
            "seconds_since_last_step": (round(now - progress["time"], 1)
                                        if progress and progress.get("run_id") == record["run_id"]
                                        else None)}
    return dict(record, restarts=int(record.get("restarts", 0)) + 1,
                steps_lost=int(record.get("steps_lost", 0)) + lost, last_restart=last)
