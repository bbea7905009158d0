"""The Reducer interface: everything the training loop knows about averaging gradients.

Values and decisions that are not gradients (votes, metric means, gathers, barriers) go
through the job's control plane (hpcaccel/control.py), never through a Reducer.

Cross-rank invariant: every method is collective unless marked local. All ranks call the
same methods in the same order, with tensors of the same shapes and dtypes.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch

from ..timeline import NullTimeline


class Reducer(ABC):
    name: str = "?"

    def describe(self) -> str:
        """Local. The backend, and how it sums, for the start-up line."""
        return self.name

    def __init__(self, comm, timeline=None):
        """comm: the job's mpi4py communicator; every backend runs on it. timeline: a
        Timeline (--timeline) the backend records its communication spans in; backends that
        cannot see their own communication (Horovod) leave it unused."""
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeline = timeline if timeline is not None else NullTimeline()
        self.optimizer = None

    # -- set-up ---------------------------------------------------------------------------
    @abstractmethod
    def broadcast_parameters(self, module: torch.nn.Module, root: int = 0) -> None:
        """Copy `root`'s parameters and buffers to every rank, in place."""

    @abstractmethod
    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Start averaging `model`'s gradients across ranks during backward. `optimizer`
        stays the one that steps and owns the state (checkpoint it, not a wrapper); the
        caller steps it after synchronize()."""

    # -- per step -------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Local. Clear gradients before the next forward/backward."""
        self.optimizer.zero_grad(set_to_none=True)

    @abstractmethod
    def synchronize(self) -> None:
        """Finish averaging: afterwards each .grad holds the mean over ranks, identical on
        every rank; parameters that got no gradient on any rank have .grad None."""

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally without communication.
        Gradient accumulation over K micro-batches: the first K-1 backward passes inside
        no_sync(), the last outside it, then synchronize() and the optimizer step once."""
        yield

    # -- tensors --------------------------------------------------------------------------
    @abstractmethod
    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a tensor over ranks in place (op: sum, max, min) and return it."""

    # -- sharded optimizer state (the mpi reducer's shard option) ---------------------------
    sharded = None
    """The ShardedOptimizer when each rank steps its part of the optimizer (then the loop
    clips and steps through clip_grad_norm_() and step() below), else None."""

    def wait_parameters(self) -> None:
        """Local. Every parameter's value complete on this rank (sharded: no allgather of
        updated values still in flight)."""

    @contextlib.contextmanager
    def full_optimizer_state(self):
        """Collective. Within it the optimizer holds its whole state where a checkpoint is
        written (rank 0); sharded reducers gather it for the time being."""
        yield

    def optimizer_state_loaded(self) -> None:
        """Local. The optimizer was just given a whole state (a checkpoint's); a sharded
        reducer keeps this rank's part of it."""

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Local. This rank's communication state a resumed run needs (PowerSGD's error
        feedback and Q); it may differ per rank, so checkpoints keep every rank's."""
        return {}

    def load_state_dict(self, state: dict, exact: bool = True) -> None:
        """Local. Restore state_dict(); exact=False: from a run of another world size (keep
        what is the same on every rank, drop per-rank residuals)."""

    def close(self) -> None:
        """Local. Release resources; idempotent."""
