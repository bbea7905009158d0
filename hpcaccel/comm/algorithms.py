"""Allreduce algorithms for the mpi reducer: how one flat buffer is summed across ranks.

The reducer owns buckets, hooks, overlap and the mean; an algorithm only sums a 1-d NumPy
buffer in place over the communicator (`allreduce_(buffer, op)`). New algorithms (a
node-aware hierarchical allreduce, ...) are small classes with this one method, passed to
MPIReducer(algorithm=...).

Cross-rank invariants (every algorithm keeps them):
  * Collective over its communicator: every rank calls allreduce_ with buffers of the same
    length, dtype and op, in the same order, and issues the same MPI calls in the same order.
  * In place: afterwards the buffer holds the same sum on every rank.
  * At most one thread calls it at a time (the reducer's communication thread during a step).
"""
from __future__ import annotations

# Largest single MPI_Allreduce; bigger buffers go as consecutive calls on slices. Measured
# with Open MPI 4.1 shared memory, 2 ranks: 7.1 GB/s busbw at 4-16 MiB but 2.2 GB/s at 64 MiB
# (messages beyond the caches), so a 96 MiB gradient takes a third of the time in slices.
CHUNK_BYTES = 8 << 20


class LibraryShards:
    """The two halves of an allreduce, for sharded optimizers (sharding.py), by the MPI
    library's MPI_Reduce_scatter and MPI_Allgatherv over `comm`: part `rank` of
    ring.chunk_bounds(len, size) is this rank's. Within one host the library's shared-memory
    collectives are the fastest measured, as for the allreduce."""

    def __init__(self, comm):
        self.comm = comm

    def reduce_scatter_(self, buf, op) -> None:
        from .ring import chunk_bounds, library_reduce_scatter
        array = buf[0] if isinstance(buf, list) else buf
        library_reduce_scatter(self.comm, buf, op, chunk_bounds(len(array), self.comm.Get_size()))

    def allgather_(self, buf) -> None:
        from .ring import chunk_bounds, library_allgather
        array = buf[0] if isinstance(buf, list) else buf
        library_allgather(self.comm, buf, chunk_bounds(len(array), self.comm.Get_size()))


class SlicedAllreduce:
    """The MPI library's own MPI_Allreduce(IN_PLACE), in slices of at most chunk_bytes."""

    name = "sliced"

    def __init__(self, comm, chunk_bytes: int = CHUNK_BYTES):
        from mpi4py import MPI

        self.comm, self._in_place = comm, MPI.IN_PLACE
        self.chunk_bytes = int(chunk_bytes)

    def allreduce_(self, buf, op) -> None:
        """Sum (or `op`) a 1-d array, or [array, MPI datatype], in place over the ranks.
        Every rank slices identically (same length, same chunk size), so the calls match
        one to one."""
        array, rest = (buf[0], buf[1:]) if isinstance(buf, list) else (buf, None)
        step = max(1, self.chunk_bytes // array.itemsize)
        for start in range(0, len(array), step):
            part = array[start:start + step]
            self.comm.Allreduce(self._in_place, [part, *rest] if rest else part, op=op)
