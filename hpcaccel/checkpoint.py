"""Checkpoints: the one place that knows their format.

A checkpoint is a torch file (loadable with weights_only=True) holding the model and
optimizer state, the data position (epoch, step within epoch), the global step, every rank's
RNG state, a fingerprint of the model's parameter names and shapes, and the record of the
run that owns OUT (`run`: run id, model digest, data, global batch, epochs; rundir.py), so a
resume can tell whose checkpoint it is. Files live in OUT/checkpoints/step-XXXXXXXX.pt, are
written atomically by rank 0, and the newest K are kept (never deleting the one just written).

Cross-rank invariant: model and optimizer state are identical on every rank (same start,
same averaged gradients), so rank 0's copy stands for all; RNG states differ per rank and
are gathered.
"""
from __future__ import annotations

import glob
import os
import re

import torch

from .errors import UsageError
from .fsutil import atomic_write

FORMAT = "hpcaccel-checkpoint"
VERSION = 1
_NAME = re.compile(r"step-(\d{8,})\.pt$")


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def fingerprint(model: torch.nn.Module) -> list:
    return [[name, list(t.shape)] for name, t in model.state_dict().items()]


def rng_state() -> torch.Tensor:
    return torch.get_rng_state()


def build(model, optimizer, epoch: int, step_in_epoch: int, global_step: int,
          rng_states: list, extra: dict | None = None) -> dict:
    return {"format": FORMAT, "version": VERSION, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
            "global_step": global_step, "rng": rng_states, "fingerprint": fingerprint(model),
            **(extra or {})}


def save(out: str, state: dict, keep: int) -> str:
    """Write atomically, then prune. Rank 0 only. The record of the run owning `out`
    (OUT/run.json) goes into the file. Pruning keeps this file and the newest keep-1 of
    the earlier steps; later steps are left over from before an explicit --resume of an
    earlier checkpoint (an abandoned continuation) and would be taken by --resume auto
    instead of this one, so they go."""
    from .rundir import read_record

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


def _step(path: str) -> int:
    return int(_NAME.search(path).group(1))


def list_checkpoints(out: str) -> list[str]:
    """Complete checkpoints in `out`, oldest first (temp files of interrupted saves excluded)."""
    found = [p for p in glob.glob(os.path.join(checkpoint_dir(out), "step-*.pt")) if _NAME.search(p)]
    return sorted(found, key=_step)


def header(path: str, model_fingerprint: list) -> dict:
    """A checkpoint's fields other than tensors (epoch, step_in_epoch, global_step, run),
    checked against the model's fingerprint. Memory-maps the file: cheap at any size."""
    state = _read(path, mmap=True)
    _check(state, path, model_fingerprint)
    return {k: state.get(k) for k in ("epoch", "step_in_epoch", "global_step", "run")}


def load(path: str, model: torch.nn.Module) -> dict:
    """Load and check a checkpoint against `model`. Bad input -> UsageError naming the file."""
    state = _read(path)
    _check(state, path, fingerprint(model))
    return state


def _read(path: str, mmap: bool = False) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _check(state, path: str, model_fingerprint: list) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"--resume {path}: not an hpcaccel checkpoint")
    if state.get("version") != VERSION:
        raise UsageError(f"--resume {path}: checkpoint version {state.get('version')}, "
                         f"this hpcaccel reads version {VERSION}")
    if state["fingerprint"] != model_fingerprint:
        mine = {n for n, _ in model_fingerprint}
        theirs = {n for n, _ in state["fingerprint"]}
        diff = sorted(mine ^ theirs)[:3] or ["parameter shapes"]
        raise UsageError(f"--resume {path}: checkpoint is from a different model "
                         f"(differs in {', '.join(diff)})")
