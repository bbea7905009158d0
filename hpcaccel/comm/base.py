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

    def __init__(self, rank: int, size: int):
        self.rank = rank
        self.size = size

    # -- set-up ---------------------------------------------------------------------------
    @abstractmethod
    def broadcast_parameters(self, module: torch.nn.Module, root: int = 0) -> None:
        """Copy `root`'s parameters and buffers to every rank, in place."""

    @abstractmethod
    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Start averaging `model`'s gradients across ranks during backward."""

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
        """Backward passes inside accumulate gradients locally without communication."""
        yield

    # -- values ---------------------------------------------------------------------------
    @abstractmethod
    def allreduce_array(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        """Reduce a small float64 array over ranks (op: sum, max, min)."""

    def mean(self, *values: float) -> list[float]:
        """Average scalars over ranks (metrics)."""
        return [float(v) for v in self.allreduce_array(np.asarray(values, dtype=np.float64)) / self.size]

    @abstractmethod
    def broadcast_object(self, obj, root: int = 0):
        """Pickle-broadcast a small Python object from root."""

    @abstractmethod
    def gather_object(self, obj, root: int = 0) -> list | None:
        """Pickle-gather small Python objects to root (a list by rank there, None elsewhere)."""

    @abstractmethod
    def barrier(self) -> None: ...

    def close(self) -> None:
        """Local. Release resources; idempotent."""
