"""Checkpoints: the one place that knows their format.

A checkpoint is a torch file (loadable with weights_only=True) holding the model and
optimizer state, the data position (epoch, step within epoch), the global step, every rank's
RNG state, and a fingerprint of the model's parameter names and shapes. Files live in
OUT/checkpoints/step-XXXXXXXX.pt, are written atomically by rank 0, and the newest K are kept.

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
    """Write atomically, then delete all but the newest `keep`. Rank 0 only."""
    path = os.path.join(checkpoint_dir(out), f"step-{state['global_step']:08d}.pt")
    atomic_write(path, lambda fh: torch.save(state, fh))
    for old in list_checkpoints(out)[:-keep]:
        os.unlink(old)
    return path


def list_checkpoints(out: str) -> list[str]:
    """Complete checkpoints in `out`, oldest first (temp files of interrupted saves excluded)."""
    found = [p for p in glob.glob(os.path.join(checkpoint_dir(out), "step-*.pt")) if _NAME.search(p)]
    return sorted(found, key=lambda p: int(_NAME.search(p).group(1)))


def resolve(resume: str, out: str) -> str | None:
    """--resume: none, auto (newest in OUT/checkpoints, or start fresh), or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    if not os.path.exists(resume):
        raise UsageError(f"--resume {resume}: no such file")
    return resume


def load(path: str, model: torch.nn.Module) -> dict:
    """Load and check a checkpoint against `model`. Bad input -> UsageError naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"--resume {path}: not an hpcaccel checkpoint")
    if state.get("version") != VERSION:
        raise UsageError(f"--resume {path}: checkpoint version {state.get('version')}, "
                         f"this hpcaccel reads version {VERSION}")
    if state["fingerprint"] != fingerprint(model):
        mine = {n for n, _ in fingerprint(model)}
        theirs = {n for n, _ in state["fingerprint"]}
        diff = sorted(mine ^ theirs)[:3] or ["parameter shapes"]
        raise UsageError(f"--resume {path}: checkpoint is from a different model "
                         f"(differs in {', '.join(diff)})")
    return state
