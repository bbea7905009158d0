"""Buffers across ranks: one model to evaluate and to save.

Parameters stay identical on every rank (the same start, the same averaged gradients);
buffers do not. A BatchNorm layer updates its running_mean and running_var in every
training forward from the rank's own samples, so after a step each rank holds other
statistics: another model in evaluation mode. (DDP broadcasts rank 0's buffers before every
forward.) Here the ranks agree on one set of buffers before every evaluation and every
save (`RankBuffers.agree`, `RankBuffers.saving`):

  floating-point buffers  the mean over ranks. For BatchNorm's running mean that is the
                          running mean of the global batches' means (the update is linear and
                          every rank's batch has the same size); the running variance becomes
                          the mean of the ranks' batch variances.
  other buffers           rank 0's (num_batches_tracked: the same on every rank anyway, as
                          every rank takes the same steps).

Training forwards normalise by the batch's own statistics, not the running ones, so agreeing
changes no parameter and no gradient, only the statistics later steps update from.

Cross-rank invariant: after `agree()` every rank holds bitwise the same buffers. The sum is
one allreduce; rank 0's result is then broadcast, so no MPI library's reduction order can
leave two ranks an ulp apart. agree() and saving() are collective; whether they communicate
at all (`agreed`) changes at the same steps on every rank, as every rank trains the same
steps.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


class RankBuffers:
    """The model's persistent buffers (those its state_dict saves) and whether the ranks
    still hold the same ones."""

    def __init__(self, model: torch.nn.Module, control):
        """control: the job's ControlPlane."""
        saved = model.state_dict(keep_vars=True)
        named = [(name, b) for name, b in model.named_buffers() if name in saved]
        # floating-point ones first: the order of the agreed vector (_agreed_values)
        self.named = ([(n, b) for n, b in named if b.is_floating_point()]
                      + [(n, b) for n, b in named if not b.is_floating_point()])
        self.control = control
        # communicate only where ranks can differ; not yet agreed: a resume may have put
        # each rank's own buffers back (restore_own)
        self.agreed = control.size == 1 or not self.named

    def trained(self) -> None:
        """Local, after every training forward (on every rank alike): buffers may differ now."""
        if self.control.size > 1 and self.named:
            self.agreed = False

    def agree(self) -> None:
        """Collective: every rank's buffers become the agreed ones, in place (evaluation and
        model.pt see them)."""
        if self.agreed:
            return
        self._load(self._agreed_values())
        self.agreed = True

    @contextlib.contextmanager
    def saving(self):
        """Collective: inside, the model holds the agreed buffers (what a checkpoint saves);
        afterwards each rank's own again, so a checkpoint taken at a step an uninterrupted
        run does not take (a stop signal, a timed checkpoint) changes nothing it computes.
        Yields this rank's own buffers ({} where the ranks agree already), for the
        checkpoint's per-rank part: a resume at the same world size puts them back."""
        if self.agreed:
            yield {}
            return
        own = {name: b.detach().cpu().clone() for name, b in self.named}
        self._load(self._agreed_values())
        try:
            yield own
        finally:
            self._load(list(own.values()))

    def _agreed_values(self) -> list[torch.Tensor]:
        """The agreed value of each buffer of `named` (floating-point ones first)."""
        floats = [b for _, b in self.named if b.is_floating_point()]
        total = self.control.allreduce(_flat(floats))
        agreed = None
        if self.control.is_main:  # the float means, then its own other buffers
            agreed = np.concatenate([total / self.control.size,
                                     _flat([b for _, b in self.named[len(floats):]])])
        # one float64 vector (integer buffers exact up to 2**53), which every rank rounds to
        # the buffers' dtypes alike
        agreed, values, pos = self.control.broadcast(agreed), [], 0
        for _, b in self.named:
            values.append(torch.from_numpy(agreed[pos:pos + b.numel()]).reshape(b.shape).to(b.dtype))
            pos += b.numel()
        return values

    @torch.no_grad()
    def _load(self, values) -> None:
        for (_, b), value in zip(self.named, values):
            b.copy_(value)


def _flat(tensors) -> np.ndarray:
    """The tensors' values as one float64 vector, on the CPU."""
    if not tensors:
        return np.zeros(0)
    return np.concatenate([t.detach().cpu().double().reshape(-1).numpy() for t in tensors])


def restore_own(model: torch.nn.Module, saved: list | None, rank: int, size: int) -> None:
    """Local, after loading a checkpoint's model (the agreed buffers): where it was taken
    mid-epoch at this world size, this rank's own buffers as they were (bit-for-bit
    continuation); from another world size, the agreed ones stay on every rank."""
    if not saved or len(saved) != size or not saved[rank]:
        return
    own = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in saved[rank].items():
            own[name].copy_(value)
