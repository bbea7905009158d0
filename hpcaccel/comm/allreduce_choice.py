"""Which allreduce algorithm the mpi reducer uses (--allreduce), chosen once, collectively.

  sliced        the MPI library's MPI_Allreduce in 8 MiB slices (algorithms.py): fastest
                within one host (shared memory), where it stays the choice.
  ring          pipelined ring over point-to-point eager segments (ring.py): the link rate
                across hosts where the library's allreduce reached about half of it.
  hierarchical  reduce within each host, ring across hosts on 1/L of the buffer per local
                rank, broadcast within the host (hierarchical.py).
  auto          sliced on one host; across hosts hierarchical when every host runs the same
                number (> 1) of ranks, else ring.

Cross-rank invariant: the choice depends only on the communicator's layout as every rank
sees it after an allgather (node_layout), never on per-rank state, so all ranks build the
same algorithm with the same parameters and their messages match.
"""
from __future__ import annotations

from ..config import ALLREDUCES
from .algorithms import CHUNK_BYTES, SlicedAllreduce
from .hierarchical import HierarchicalAllreduce, node_layout
from .ring import RingAllreduce


def resolve(name: str, hosts: int, per_host: int | None) -> str:
    """Pure. The algorithm `name` means for `hosts` hosts with `per_host` ranks each (None:
    uneven)."""
    if name != "auto":
        return name
    if hosts <= 1:
        return "sliced"
    return "hierarchical" if per_host and per_host > 1 else "ring"


def make_algorithm(comm, name: str = "auto", chunk_bytes: int = CHUNK_BYTES):
    """Collective. The allreduce algorithm `name` over `comm` (see the module docstring)."""
    from ..errors import UsageError

    if name not in ALLREDUCES:
        raise UsageError(f"--allreduce: unknown {name!r} (choose from {', '.join(ALLREDUCES)})")
    if comm.Get_size() == 1:
        return SlicedAllreduce(comm, chunk_bytes)
    local, hosts, per_host = node_layout(comm)
    chosen = resolve(name, hosts, per_host)
    if chosen == "hierarchical":
        if per_host is None:
            local.Free()
            raise UsageError("--allreduce hierarchical needs the same number of ranks on every "
                             "host; use --allreduce ring (or auto)")
        return HierarchicalAllreduce(comm, chunk_bytes, layout=(local, hosts, per_host))
    local.Free()
    if chosen == "ring":
        return RingAllreduce(comm)
    return SlicedAllreduce(comm, chunk_bytes)


def describe(algorithm) -> str:
    """One phrase for the start-up line."""
    if hasattr(algorithm, "describe"):
        return algorithm.describe()
    return f"{algorithm.name} MPI_Allreduce"
