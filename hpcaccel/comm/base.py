"""The Reducer interface: everything the training loop knows about communication.

Cross-rank invariant: every method is collective unless marked local. All ranks call the
same methods in the same order, with tensors of the same shapes and dtypes.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import numpy as np
import torch


class Reducer(ABC):
    name: str = "?"
    # A Timeline (--timeline) the backend records its communication spans in, or None.
    # Backends that cannot see their own communication (Horovod) leave it unused.
    trace = None

    def __init__(self, comm):
        """comm: the job's mpi4py communicator; every backend runs on it."""
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    # -- set-up ---------------------------------------------------------------------------
    @abstractmethod
    def broadcast_parameters(self, module: torch.nn.Module, root: int = 0) -> None:
        """Copy `root`'s parameters and buffers to every rank, in place."""

    def broadcast_optimizer_state(self, root: int = 0) -> None:
        """Copy `root`'s optimizer state (momentum, Adam moments, hyperparameters) to every
        rank. Call after attach(). Ships the whole state_dict: fine for the occasional call."""
        state = self.broadcast_object(self.optimizer.state_dict() if self.rank == root else None, root)
        if self.rank != root:
            self.optimizer.load_state_dict(state)

    @abstractmethod
    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Start averaging `model`'s gradients across ranks during backward. `optimizer`
        stays the one that steps and owns the state (checkpoint it, not a wrapper)."""

    # -- per step -------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Local. Clear gradients before the next forward/backward."""
        self.optimizer.zero_grad(set_to_none=True)

    @abstractmethod
    def synchronize(self) -> None:
        """Finish averaging: afterwards each .grad holds the mean over ranks, identical on
        every rank; parameters that got no gradient on any rank have .grad None."""

    def step(self) -> None:
        """Local. Apply the optimizer to the averaged gradients."""
        self.optimizer.step()

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally without communication.
        Gradient accumulation over K micro-batches: the first K-1 backward passes inside
        no_sync(), the last outside it, then synchronize() and step() once."""
        yield

    # -- values ---------------------------------------------------------------------------
    @abstractmethod
    def allreduce_array(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        """Reduce a small float64 array over ranks (op: sum, max, min)."""

    @abstractmethod
    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a tensor over ranks in place (op: sum, max, min) and return it."""

    def mean(self, *values: float) -> list[float]:
        """Average scalars over ranks (metrics)."""
        return [float(v) for v in self.allreduce_array(np.asarray(values, dtype=np.float64)) / self.size]

    # Small control messages go over the job's mpi4py communicator (`self.comm`, which every
    # backend runs on): Horovod's object collectives each wait for a background cycle, and
    # Horovod has no gather to one rank.
    def broadcast_object(self, obj, root: int = 0):
        """Pickle-broadcast a small Python object from root."""
        return self.comm.bcast(obj, root=root)

    def gather_object(self, obj, root: int = 0) -> list | None:
        """Pickle-gather small Python objects to root (a list by rank there, None elsewhere)."""
        return self.comm.gather(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def close(self) -> None:
        """Local. Release resources; idempotent."""
