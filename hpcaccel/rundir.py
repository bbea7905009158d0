"""One run per output directory: who owns --out, and whether this start continues it.

OUT/run.json records the run that owns the directory (runrecord.py: what it holds, how it
is read, written and compared with a start). OUT/run.lock is held while a run is running
(runlock.py).

Decisions at start-up (rank 0, after every flag and file was checked), by --resume:
  none  OUT holds no run outputs -> a new run. Otherwise exit 2, unless --overwrite: the
        old outputs move to OUT/previous/<run id>/ (nothing is deleted), then a new run.
  auto  no outputs -> a new run; outputs of a run this one matches -> continue from its
        newest checkpoint, or "already complete" when it has trained --epochs epochs;
        outputs of another run -> exit 2 naming the difference (or --overwrite, as above).
  PATH  the checkpoint must match the model, data and global batch; OUT must be empty or
        hold the checkpoint's own run (or --overwrite).
A start at another world size than the checkpoint's (`layout` given: hpcaccel.train)
continues it with the checkpoint's global batch where elastic.resume_plan can keep it
(Claim.plan), and says in one line why where it cannot. Every continuation counts as a
restart in run.json (runrecord.counted_restart). The rules that need no model or data (the
lock, outputs under --resume none, outputs without run.json, a finished run whose
checkpoints are gone, another run's checkpoint) are `refusal`'s, which the doctor asks as
well. Output paths are checked (`check_paths`) before the claim, so a bad one leaves OUT
untouched.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass

from . import checkpoint, elastic
from .errors import UsageError
from .runlock import LOCK, Lock, in_use
from .runrecord import (PROGRESS, RECORD, counted_restart, data_identity,
                        global_batch_mismatch, mismatch, model_digest, read_progress,
                        read_record, write_record)

OUTPUTS = (RECORD, "summary.json", "metrics.jsonl", "model.pt", "checkpoints", PROGRESS)


# -- identity ------------------------------------------------------------------------------
def identity(model, train_ds, global_batch: int | None, epochs: int | None,
             task: str | None = None) -> dict:
    """This start's identity; compared with a run record by runrecord.mismatch. `task`: the
    task's name (--task auto resolved). A script's Job (hpcaccel/torch/extras.py) may know
    no data (train_ds and global_batch None) or no epochs (None): what it does not know is
    neither recorded nor compared."""
    return {"model": model_digest(checkpoint.fingerprint(model)),
            "data": None if train_ds is None else data_identity(train_ds),
            "global_batch": None if global_batch is None else int(global_batch),
            "epochs": None if epochs is None else int(epochs),
            **({"task": task} if task else {})}


def outputs_in(out: str, extra=()) -> list[str]:
    """Run outputs present in `out` (an empty checkpoints/ does not count); `extra`: other
    files of the run inside `out` (a --timeline there), relative to it."""
    found = [n for n in OUTPUTS if n != "checkpoints" and os.path.exists(os.path.join(out, n))]
    if checkpoint.list_checkpoints(out):
        found.append("checkpoints")
    return found + [n for n in extra if n not in found and os.path.isfile(os.path.join(out, n))]


def inside(out: str, path: str | None) -> str | None:
    """`path` relative to `out` if it lies inside it, else None."""
    if not path:
        return None
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    return None if rel == "." or rel.split(os.sep)[0] == ".." else rel


def check_paths(out: str, files: dict) -> None:
    """Before the claim, without writing anything: --out must be a directory or creatable,
    and each output file (`files`: flag -> path or None, e.g. --timeline) writable, in a
    directory that exists or is --out itself (the claim creates it). UsageError naming the
    flag otherwise."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    existing = os.path.abspath(out)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--out {out}: cannot create it ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: " + ("not writable" if existing == os.path.abspath(out)
                                             else f"cannot create it ({existing} is not writable)"))
    for flag, path in files.items():
        if path:
            _check_file(flag, path, out)


def _check_file(flag: str, path: str, out: str) -> None:
    if os.path.isdir(path) or os.path.abspath(path) == os.path.abspath(out):
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    rel = inside(out, path)
    if rel is not None and rel.split(os.sep)[0] in OUTPUTS + (LOCK, "previous"):
        raise UsageError(f"{flag} {path}: inside --out {out}, where the run keeps its own "
                         f"{rel.split(os.sep)[0]}; choose another name")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if parent == os.path.abspath(out) and not os.path.isdir(out):
        return  # the claim creates --out
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot create it ({parent} is not writable)")


# -- the decision --------------------------------------------------------------------------
@dataclass
class Claim:
    """What rank 0 decided; `lock` on rank 0 only (None in the broadcast copy)."""
    run_id: str
    checkpoint: str | None = None   # continue from this file; None: a new run
    complete: bool = False          # the run already trained --epochs epochs: nothing to do
    lock: Lock | None = None
    plan: elastic.ResumePlan | None = None  # continuing: this start's layout and position
    restarts: dict | None = None    # continuing: run.json's restarts, steps_lost, last restart

    def shared(self) -> "Claim":
        return Claim(self.run_id, self.checkpoint, self.complete, plan=self.plan,
                     restarts=self.restarts)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim(out: str, resume: str, overwrite: bool, mine: dict,
          required: checkpoint.Requirements, info=print, extra=(),
          layout: tuple | None = None) -> Claim:
    """Rank 0: lock `out` and decide (see the module docstring). `required`: what a
    checkpoint must match (checkpoint.requirements); `extra`: this start's other output
    files inside `out` (relative), kept in run.json and moved aside with the rest;
    `layout`: (world size, --batch-size, --accum-steps) of a start that may continue a
    checkpoint of another world size (elastic.resume_plan). UsageError for a refusal; the
    lock is released again then."""
    if layout is not None:  # recorded by a new run: the world size it started with
        mine = dict(mine, world_size=int(layout[0]))
    lock = Lock.acquire(out, info)
    try:
        c = _decide(out, resume, overwrite, mine, required, tuple(extra), info, layout)
    except BaseException:
        lock.release()
        raise
    c.lock = lock
    return c


def refusal(out: str, resume: str = "none", overwrite: bool = False) -> str | None:
    """Why hpcaccel.train with these --resume and --overwrite flags would stop at once on
    `out`, whatever its model and data: a live run's lock, or one of the rules that read
    only OUT and the checkpoint (module docstring); None if training may start there (it
    then compares model, data and global batch with the run's). The doctor asks this."""
    try:
        held = in_use(out)
        if held or not os.path.isdir(out):
            return held
        record = read_record(out)
        return _refusal(out, resume, overwrite, outputs_in(out, _extra(record)), record)
    except UsageError as e:  # an unreadable --resume checkpoint
        return str(e)


def _extra(record: dict | None, extra=()) -> tuple:
    """Output files inside OUT besides OUTPUTS: the run's recorded ones and this start's."""
    return tuple(dict.fromkeys([*((record or {}).get("outputs") or []), *extra]))


def _refusal(out, resume, overwrite, present, record) -> str | None:
    if resume not in ("none", "auto") and not os.path.exists(resume):
        return f"--resume {resume}: no such file"
    if not present or overwrite:
        return None
    if record is None:
        return _unowned(out, present, resume)
    if resume == "none":
        auto = _refusal(out, "auto", False, present, record) is None
        return (f"--out {out}: holds the outputs of run {record['run_id']} ({', '.join(present)}); "
                + ("to continue it pass --resume auto, or " if auto else "")
                + f"use a new --out, or --overwrite true to move them to {_aside(out, record)}/ "
                  f"and start a new run")
    if resume == "auto":
        if not checkpoint.list_checkpoints(out) and "summary.json" in present:
            return _refuse(out, f"--resume auto: run {record['run_id']} there finished but its "
                                f"checkpoints are gone", record)
        return None
    theirs = checkpoint.header(resume).get("run") or {}
    if theirs.get("run_id") != record["run_id"]:
        return _refuse(out, "holds the outputs of another run than the checkpoint's", record)
    return None


def _unowned(out, present, resume) -> str:
    """Outputs without run.json: no start can continue them in place."""
    found = checkpoint.list_checkpoints(out)
    path = resume if resume not in ("none", "auto") else (found[-1] if found else None)
    hint = f" (with --resume {path} there to continue that checkpoint)" if path else ""
    return (f"--out {out}: holds outputs without a run record ({', '.join(present)}; no run.json: "
            f"from an older hpcaccel or another program), so no start can tell whose they are; "
            f"use a new --out{hint}, or --overwrite true to move them to {_aside(out, None)}/ "
            f"and start a new run")


def _aside(out: str, record: dict | None) -> str:
    return os.path.join(out, "previous", (record or {}).get("run_id", "<time>"))


def _refuse(out: str, why: str, record: dict | None) -> str:
    return (f"--out {out}: {why}; use a new --out, or --overwrite true to move its outputs to "
            f"{_aside(out, record)}/ and start a new run there")


def _decide(out, resume, overwrite, mine, required, extra, info, layout=None) -> Claim:
    record = read_record(out)
    extra = _extra(record, extra)
    present = outputs_in(out, extra)
    why = _refusal(out, resume, overwrite, present, record)
    if why:
        raise UsageError(why)
    if resume == "none" or (resume == "auto" and (not present or record is None)):
        return _new_run(out, mine, present, record, extra, info)  # (--overwrite if present)
    if resume == "auto":
        found = checkpoint.list_checkpoints(out)
        # where it would go on: the newest checkpoint, or the start of a run that has none
        head = (checkpoint.header(found[-1]) if found else
                {"world_size": record.get("world_size"), "epoch": 0, "step_in_epoch": 0})
        why = mismatch(record, mine, elastic=layout is not None)
        plan, why = (None, why) if why else plan_resume(record, mine, head, layout)
        if why is None:
            if found:
                return _continue(out, found[-1], record, mine, required, extra, plan=plan)
            if "summary.json" not in present:  # ended before its first checkpoint
                info(f"hpcaccel: run {record['run_id']} in {out} has no checkpoint yet: "
                     f"starting it again")
                write_record(out, dict(record, epochs=mine["epochs"], outputs=list(extra)))
                return Claim(record["run_id"], plan=plan)
        elif not overwrite:
            raise UsageError(_refuse(out, f"--resume auto: run {record['run_id']} there cannot "
                                          f"be continued: {why}", record))
        return _new_run(out, mine, present, record, extra, info)
    # an explicit checkpoint file
    head = checkpoint.header(resume, required)
    theirs = head.get("run")
    why = theirs and mismatch(theirs, mine, elastic=layout is not None)
    plan, why = (None, why) if why else plan_resume(theirs, mine, head, layout)
    if why:
        raise UsageError(f"--resume {resume}: checkpoint cannot be continued: {why}")
    if present and record is not None and theirs and record["run_id"] == theirs["run_id"]:
        return _continue(out, resume, record, mine, required, extra, head, plan)
    if plan is not None:  # the run keeps its global batch
        mine = dict(mine, global_batch=plan.global_batch)
    if present:  # --overwrite (else refused above); the checkpoint may be among them
        dest = _move_aside(out, present, record, info)
        rel = inside(out, resume)
        if rel and any(rel == e or rel.startswith(e + os.sep) for e in present):
            resume = os.path.join(dest, rel)
    run = dict(theirs or {}, **mine, run_id=(theirs or {}).get("run_id") or uuid.uuid4().hex[:12])
    write_record(out, _stamp(dict(run, outputs=list(extra))))
    return Claim(run["run_id"], resume, plan=plan)


def plan_resume(record: dict | None, mine: dict, head: dict, layout: tuple | None
                ) -> tuple[elastic.ResumePlan | None, str | None]:
    """(plan, None) for how this start continues the checkpoint `head` (its world size,
    epoch and step) of the run `record`, or (None, why it cannot). No plan where nothing
    tells (no `layout` given: the global batch was compared by `mismatch`; no global batch
    or world size recorded): the flags stand as given. At the checkpoint's own world size
    the global batch must be the run's; at another, elastic.resume_plan keeps it or says
    why it cannot."""
    if layout is None:
        return None, None
    theirs = (record or {}).get("global_batch")
    world, batch, accum = layout
    if not theirs or not head.get("world_size") or world == head["world_size"]:
        return None, global_batch_mismatch(record or {}, mine) if theirs else None
    try:
        return elastic.resume_plan(int(theirs), int(head["world_size"]), world, batch, accum,
                                   int(head["epoch"]), int(head["step_in_epoch"])), None
    except UsageError as e:
        return None, str(e)


def _continue(out, path, record, mine, required, extra, head=None, plan=None) -> Claim:
    head = head or checkpoint.header(path, required)
    theirs = head.get("run") or {}
    if theirs.get("run_id") != record["run_id"]:
        raise UsageError(_refuse(out, f"--resume auto: the newest checkpoint {path} belongs to "
                                      f"run {theirs.get('run_id', '(none recorded)')}, not to "
                                      f"this directory's run {record['run_id']}", record))
    done = (mine["epochs"] is not None and head["step_in_epoch"] == 0
            and head["epoch"] >= mine["epochs"])
    complete = done and os.path.exists(os.path.join(out, "summary.json"))
    if complete:
        return Claim(record["run_id"], path, complete)
    record = counted_restart(dict(record, epochs=mine["epochs"], outputs=list(extra)),
                             read_progress(out), head)
    write_record(out, record)
    return Claim(record["run_id"], path, complete, plan=plan,
                 restarts={k: record[k] for k in ("restarts", "steps_lost", "last_restart")})


def _new_run(out, mine, present, record, extra, info) -> Claim:
    if present:
        _move_aside(out, present, record, info)
    run = _stamp(dict(mine, run_id=uuid.uuid4().hex[:12], outputs=list(extra)))
    write_record(out, run)
    return Claim(run["run_id"])


def _stamp(run: dict) -> dict:
    return dict(run, host=socket.gethostname(), started=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _move_aside(out, present, record, info) -> str:
    """--overwrite: move the previous run's outputs to OUT/previous/<run id>/ (returned);
    nothing is deleted (rename within one directory tree: atomic per file, no copy)."""
    name = (record or {}).get("run_id") or time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(out, "previous", name)
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(out, "previous", f"{name}-{n}")
    os.makedirs(dest)
    for entry in present:
        os.makedirs(os.path.dirname(os.path.join(dest, entry)), exist_ok=True)
        shutil.move(os.path.join(out, entry), os.path.join(dest, entry))
    info(f"hpcaccel: --overwrite: moved the previous run's outputs to {dest}/")
    return dest


def claim_collectively(cfg, control, model, train_ds, world_size: int,
                       required: checkpoint.Requirements, info=print,
                       task: str | None = None) -> Claim:
    """Every rank: rank 0 claims cfg.out; the decision (not the lock) reaches all ranks.
    A refusal is a UsageError on every rank (exit 2, one line from rank 0). A --timeline
    inside cfg.out belongs to the run's outputs. `task`: the task's name. A checkpoint of
    another world size is continued with its global batch (Claim.plan)."""
    mine = identity(model, train_ds, cfg.batch_size * world_size, cfg.epochs, task)
    timeline = inside(cfg.out, cfg.timeline)
    return claim_shared(control, cfg.out, cfg.resume, cfg.overwrite, mine, required, info,
                        extra=[timeline] if timeline else [],
                        layout=(world_size, cfg.batch_size, cfg.accum_steps))


def claim_shared(control, out: str, resume: str, overwrite: bool, mine: dict,
                 required: checkpoint.Requirements, info=print, extra=(),
                 layout: tuple | None = None) -> Claim:
    """Every rank: rank 0 claims `out` for a start of identity `mine` (`claim`), and the
    decision (not the lock) reaches all ranks. A refusal is a UsageError on every rank.
    hpcaccel.train (claim_collectively) and a script's hpcaccel.torch.Job both claim here."""
    def on_main():
        if not control.is_main:
            return None
        return claim(out, resume, overwrite, mine, required, info, extra=extra, layout=layout)

    decided = control.collectively(on_main)
    shared = control.broadcast(decided.shared() if decided is not None else None)
    shared.lock = decided.lock if decided is not None else None
    return shared
