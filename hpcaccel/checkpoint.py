"""Checkpoints: the one place that knows their format.

A checkpoint is a torch file (loadable with weights_only=True) holding the model and
optimizer state, the data position (epoch, step within epoch: global batches taken, the same
at any world size), the global step, every rank's RNG state (their count is the world size), a fingerprint of the model's parameter names and shapes, and the record of the
run that owns OUT (`run`: run id, model digest, data, global batch, epochs; runrecord.py), so a
resume can tell whose checkpoint it is. Files live in OUT/checkpoints/step-XXXXXXXX.pt, are
written atomically by rank 0, and the newest K are kept (never deleting the one just written).

What a start must match to continue a checkpoint (`Requirements`, checked by `header` and
`load` before anything is loaded): the model (parameter names and shapes), the optimizer
(`--optimizer`: its state, momentum buffers or Adam moments, means nothing to another), the
task and its loss (`--task`, `--loss`: train_loss and the metrics must not change meaning
mid-run), the trainable parameters (`--freeze`: the optimizer's parameter groups), and, where both
compress with PowerSGD at the same world size, the matrices it compresses (the per-rank
error feedback is kept per matrix). Hyperparameters (--lr, --momentum, --weight-decay, ...)
may change: the optimizer keeps this start's (`load_optimizer`). Another --compression
drops PowerSGD's error feedback, as another world size does.

Cross-rank invariant: parameters and optimizer state are identical on every rank (same
start, same averaged gradients), so rank 0's copy stands for all; buffers (BatchNorm's
running statistics) are agreed by the ranks before the loop saves (buffers.py), and a
mid-epoch checkpoint gathers each rank's own besides; RNG states differ per rank and are
gathered.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

import torch

from .errors import UsageError
from .fsutil import atomic_write
from .runrecord import read_record

FORMAT = "hpcaccel-checkpoint"
VERSION = 1
_NAME = re.compile(r"step-(\d{8,})\.pt$")


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def fingerprint(model: torch.nn.Module) -> list:
    return [[name, list(t.shape)] for name, t in model.state_dict().items()]


def rng_state() -> torch.Tensor:
    return torch.get_rng_state()


def optimizer_name(optimizer) -> str:
    """The optimizer as --optimizer names it (sgd, adamw, lars: its class name, lower case)."""
    return type(optimizer).__name__.lower()


@dataclass(frozen=True)
class Requirements:
    """What a checkpoint must match for this start to continue it (see the module
    docstring); a field left None is not checked."""
    fingerprint: list
    optimizer: str | None = None
    group_sizes: tuple | None = None   # trainable tensors per optimizer parameter group
    powersgd: tuple | None = None      # (rank, keys of the matrices it compresses)
    world_size: int | None = None
    task: str | None = None            # the task's name (--task auto resolved)
    loss: str | None = None            # its loss (--loss; cross-entropy for classifiers)


def requirements(model, optimizer, reducer_state: dict, world_size: int,
                 task=None) -> Requirements:
    """This start's requirements: `reducer_state` is the attached reducer's state_dict()
    (PowerSGD's, where it compresses, lists the matrices by key); `task`: the tasks.Task
    trained (None: not checked, as for a script's Job)."""
    psgd = (reducer_state or {}).get("powersgd")
    return Requirements(
        fingerprint(model), optimizer_name(optimizer), _group_sizes(optimizer.state_dict()),
        (psgd["rank"], frozenset(psgd["params"])) if psgd else None, world_size,
        task.name if task is not None else None, task.loss_name if task is not None else None)


def task_fields(task) -> dict:
    """What a checkpoint records of the task trained, for `Requirements` to check."""
    return {"task": task.name, "loss": task.loss_name}


def _group_sizes(optimizer_state: dict) -> tuple:
    return tuple(len(g["params"]) for g in optimizer_state["param_groups"])


def build(model, optimizer, epoch: int, step_in_epoch: int, global_step: int,
          rng_states: list, extra: dict | None = None) -> dict:
    return {"format": FORMAT, "version": VERSION, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "optimizer_name": optimizer_name(optimizer),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "rng": rng_states, "fingerprint": fingerprint(model), **(extra or {})}


def save(out: str, state: dict, keep: int) -> str:
    """Write atomically, then prune. Rank 0 only. The record of the run owning `out`
    (OUT/run.json) goes into the file. Pruning keeps this file and the newest keep-1 of
    the earlier steps; later steps are left over from before an explicit --resume of an
    earlier checkpoint (an abandoned continuation) and would be taken by --resume auto
    instead of this one, so they go."""
    record = read_record(out)
    if record is not None:
        state = dict(state, run=record)
    step = state["global_step"]
    path = os.path.join(checkpoint_dir(out), f"step-{step:08d}.pt")
    atomic_write(path, lambda fh: torch.save(state, fh))
    earlier = [p for p in list_checkpoints(out) if _step(p) < step]
    later = [p for p in list_checkpoints(out) if _step(p) > step]
    for old in earlier[:len(earlier) - (keep - 1)] + later:
        os.unlink(old)
    return path


def save_collectively(control, out: str, keep: int, model, optimizer, epoch: int,
                      step_in_epoch: int, global_step: int, per_rank: dict | None = None,
                      extra: dict | None = None) -> str | None:
    """Collective: a checkpoint of this position. Every rank's RNG state and its `per_rank`
    values (name -> this rank's value; a name empty or None on every rank is left out) are
    gathered; rank 0 builds the checkpoint with `extra` and writes it (save: atomic, the
    newest `keep` kept) while the others wait idly in the control plane's barrier, so no
    rank goes on, or exits, before the file is complete. The path on rank 0, else None.
    hpcaccel.train's loop and a script's hpcaccel.torch.Job both save through here."""
    mine = per_rank or {}
    gathered = control.gather((rng_state(), mine))
    path = None
    if control.is_main:
        fields = dict(extra or {})
        for name in mine:
            values = [of_rank[name] for _, of_rank in gathered]
            if any(values):
                fields[name] = values
        state = build(model, optimizer, epoch, step_in_epoch, global_step,
                      [rng for rng, _ in gathered], fields)
        path = save(out, state, keep)
    control.barrier()
    return path


def restore_rank_state(state: dict, reducer, rank: int, size: int, reseed: int) -> None:
    """Local: this rank's own part of a loaded checkpoint: its reducer state (PowerSGD's
    error feedback; from another world size only what every rank shares) and its RNG state
    (from another world size: seeded with `reseed` + the global step, deterministic but no
    longer bit-identical to an uninterrupted run)."""
    if "reducer" in state and reducer is not None:
        same = len(state["reducer"]) == size
        reducer.load_state_dict(state["reducer"][rank if same else 0], exact=same)
    if len(state["rng"]) == size:
        torch.set_rng_state(state["rng"][rank])
    else:
        torch.manual_seed(reseed + state["global_step"])


def _step(path: str) -> int:
    return int(_NAME.search(path).group(1))


def list_checkpoints(out: str) -> list[str]:
    """Complete checkpoints in `out`, oldest first (temp files of interrupted saves excluded)."""
    found = [p for p in glob.glob(os.path.join(checkpoint_dir(out), "step-*.pt")) if _NAME.search(p)]
    return sorted(found, key=_step)


def header(path: str, required: Requirements | None = None) -> dict:
    """A checkpoint's fields other than tensors (epoch, step_in_epoch, global_step, run),
    checked against `required` (None: only that it is an hpcaccel checkpoint). Memory-maps
    the file: cheap at any size."""
    state = _read(path, mmap=True)
    _check(state, path, required)
    head = {k: state.get(k) for k in ("epoch", "step_in_epoch", "global_step", "run")}
    # the ranks that wrote it (one RNG state each) and when
    head["world_size"] = state.get("world_size") or len(state.get("rng") or ()) or None
    try:
        head["saved"] = os.stat(path).st_mtime
    except OSError:
        head["saved"] = None
    return head


def load(path: str, required: Requirements) -> dict:
    """Load a checkpoint, checked against `required` first. Bad input -> UsageError naming
    the file or the flag."""
    state = _read(path)
    _check(state, path, required)
    return state


def load_optimizer(optimizer, saved: dict) -> None:
    """Restore a checkpoint's optimizer state (momentum buffers, Adam moments, step counts)
    keeping this start's hyperparameters: torch's load_state_dict would put the checkpoint's
    --momentum, --weight-decay, ... back in place of the flags given now."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, mine in zip(optimizer.param_groups, settings):
        group.update(mine)


def _read(path: str, mmap: bool = False) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _check(state, path: str, required: Requirements | None) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"--resume {path}: not an hpcaccel checkpoint")
    if state.get("version") != VERSION:
        raise UsageError(f"--resume {path}: checkpoint version {state.get('version')}, "
                         f"this hpcaccel reads version {VERSION}")
    if required is None:
        return
    if state["fingerprint"] != required.fingerprint:
        mine = {n for n, _ in required.fingerprint}
        theirs = {n for n, _ in state["fingerprint"]}
        diff = sorted(mine ^ theirs)[:3] or ["parameter shapes"]
        raise UsageError(f"--resume {path}: checkpoint is from a different model "
                         f"(differs in {', '.join(diff)})")
    why = _cannot_continue(state, path, required)
    if why:
        raise UsageError(why)


def _cannot_continue(state, path: str, required: Requirements) -> str | None:
    """Why this start cannot continue the checkpoint's training state; None if it can.
    (Checkpoints written before the optimizer's name, the task or the loss was recorded are
    not checked for it.)"""
    again = (f"or start a new run from its weights (--init-from {path}, in a new --out)")
    task = state.get("task")
    if required.task and task and task != required.task:
        return (f"--task {required.task}: the checkpoint {path} was trained with --task {task}; "
                f"continue with --task {task}, {again}")
    loss = state.get("loss")
    if required.loss and loss and loss != required.loss:
        return (f"--loss {required.loss}: the checkpoint {path} was trained with --loss {loss}, "
                f"and train_loss and test_loss would change meaning mid-run; continue with "
                f"--loss {loss}, {again}")
    theirs = state.get("optimizer_name")
    if required.optimizer and theirs and theirs != required.optimizer:
        return (f"--optimizer {required.optimizer}: the checkpoint {path} was trained with "
                f"--optimizer {theirs}, whose state another optimizer cannot continue; continue "
                f"with --optimizer {theirs}, or start a new run from its weights (--init-from "
                f"{path}, in a new --out)")
    sizes = _group_sizes(state["optimizer"])
    if required.group_sizes is not None and sizes != required.group_sizes:
        return (f"--freeze: the checkpoint {path} was trained with {sum(sizes)} trainable "
                f"parameter tensors, this start has {sum(required.group_sizes)} (another "
                f"--freeze); continue with the --freeze it was trained with")
    per_rank = state.get("reducer") or []
    saved = per_rank[0].get("powersgd") if per_rank else None
    if (required.powersgd and saved and len(per_rank) == required.world_size
            and not set(saved["params"]) <= required.powersgd[1]):
        # the same world size restores each rank's error feedback per compressed matrix
        return (f"--powersgd-rank {required.powersgd[0]}: the checkpoint {path} was trained "
                f"with --powersgd-rank {saved['rank']}, which compresses other matrices, so "
                f"its error feedback cannot carry over; continue with --powersgd-rank "
                f"{saved['rank']}")
    return None
