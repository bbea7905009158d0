"""Gradient reducers. The training loop sees only `Reducer`; `make_reducer` picks one."""
from __future__ import annotations

from .base import Reducer

BACKENDS = ("auto", "mpi")


def make_reducer(name: str, comm=None, bucket_bytes: int = 25 * 2**20) -> Reducer:
    """Build the reducer named `name` (auto: the best available). Collective."""
    from .mpi import MPIReducer

    if name not in BACKENDS:
        from ..errors import UsageError
        raise UsageError(f"--backend: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return MPIReducer(comm=comm, bucket_bytes=bucket_bytes)


__all__ = ["Reducer", "make_reducer", "BACKENDS"]
