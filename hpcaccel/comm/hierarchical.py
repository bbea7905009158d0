"""Node-aware (hierarchical) allreduce: reduce within each host over shared memory, exchange
across hosts in slices so each of a host's L ranks carries 1/L of its network traffic, then
share the result within the host.

With L ranks on each of H hosts and a buffer of n bytes, a flat allreduce over all H x L
ranks sends 2(HL - 1)/(HL) n per rank, and the ranks of one host share its link; here each
host sends 2(H - 1)/H n in total (each local rank l carries part l, n/L of it, through a
ring among the ranks with local rank l on the other hosts). At 2 hosts that is n per host
per direction, against 1.5 n for the flat ring over 4 ranks (the "1.5 x link" bound of
docs/benchmarks.md). The network phase takes parts of up to `part_bytes` (32 MiB) per ring
call: each ring call starts with a round trip, which cost 0.15 x the link at 8 MiB parts.
The phases within a host run over shared memory, ~50x faster than a 1-10 Gbit/s link
here, in calls of at most `chunk_bytes` (the sizes where the library's collectives are
fastest, see algorithms.py).

Cross-rank invariants:
  * Collective over its communicator: every rank calls allreduce_ with buffers of the same
    length, dtype and op, in the same order. Part boundaries are a pure function of
    (slice length, L), identical on every rank.
  * Usable only when every host has the same number of ranks L (checked collectively by
    node_layout(); make_algorithm falls back to the flat ring otherwise), so the L "cross"
    communicators each hold exactly one rank per host.
  * Phase order per slice, identical on every rank: L Reduce calls on the host (root l for
    part l), the ring on part (local rank) among the hosts, L Bcast calls (root l).
    Different slices never interleave.
  * In place: afterwards the buffer holds the same values on every rank: part l is reduced
    across hosts by one ring (each of whose chunks is computed once) and then copied by
    broadcast, so ranks agree bit for bit.
  * Only one thread calls it at a time (the reducer's communication thread during a step).
"""
from __future__ import annotations

from .algorithms import CHUNK_BYTES
from .ring import SEGMENT_BYTES, RingAllreduce, chunk_bounds, segment_bounds

PART_BYTES = 32 << 20


def node_layout(comm):
    """Collective. (shared-memory communicator of this host, number of hosts, ranks per
    host or None where hosts have different numbers of ranks). Identical answers on every
    rank (derived from an allgather)."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    sizes = comm.allgather((local.Get_rank(), local.Get_size()))
    hosts = sum(1 for local_rank, _ in sizes if local_rank == 0)
    per_host = {size for _, size in sizes}
    return local, hosts, (per_host.pop() if len(per_host) == 1 else None)


class HierarchicalAllreduce:
    """Reduce within the host, ring across hosts on 1/L of the buffer per rank, broadcast
    within the host. Collective at construction (splits the communicator)."""

    name = "hierarchical"

    def __init__(self, comm, chunk_bytes: int = CHUNK_BYTES, segment_bytes: int = SEGMENT_BYTES,
                 layout=None, part_bytes: int = PART_BYTES):
        from mpi4py import MPI

        self._MPI = MPI
        self.local, self.hosts, per_host = layout or node_layout(comm)
        if per_host is None:
            raise ValueError("hierarchical allreduce needs the same number of ranks on every host")
        self.per_host, self.local_rank = per_host, self.local.Get_rank()
        # one rank per host: those with the same local rank, in world order
        cross = comm.Split(color=self.local_rank, key=comm.Get_rank())
        self.ring = RingAllreduce(cross, segment_bytes)
        cross.Free()  # the ring keeps its own duplicate
        self.chunk_bytes, self.part_bytes = int(chunk_bytes), max(int(part_bytes), int(chunk_bytes))

    def describe(self) -> str:
        return (f"hierarchical ({self.hosts} hosts x {self.per_host} ranks: shared memory "
                f"within a host, {self.ring.describe()} across)")

    def close(self) -> None:
        """Local. Free the communicators; idempotent."""
        self.ring.close()
        if self.local != self._MPI.COMM_NULL:
            self.local.Free()

    def allreduce_(self, buf, op) -> None:
        """Sum (or `op`) a 1-d array, or [array, MPI datatype], in place over the ranks."""
        array, datatype = (buf[0], buf[1]) if isinstance(buf, list) else (buf, None)
        msg = (lambda a: a) if datatype is None else (lambda a: [a, datatype])
        L, me, in_place = self.per_host, self.local_rank, self._MPI.IN_PLACE
        # a slice is L parts of about part_bytes each: the network phase gets big messages
        step = max(L, L * (self.part_bytes // array.itemsize))
        piece = max(1, self.chunk_bytes // array.itemsize)
        for start in range(0, len(array), step):
            whole = array[start:start + step]
            parts = [whole[a:b] for a, b in chunk_bounds(len(whole), L)]
            if L > 1:
                for root, part in enumerate(parts):  # host sum of part l lands on local rank l
                    for a, b in segment_bounds(0, len(part), piece):
                        if root == me:
                            self.local.Reduce(in_place, msg(part[a:b]), op=op, root=root)
                        else:
                            self.local.Reduce(msg(part[a:b]), None, op=op, root=root)
            self.ring.allreduce_(msg(parts[me]), op)
            if L > 1:
                for root, part in enumerate(parts):
                    for a, b in segment_bounds(0, len(part), piece):
                        self.local.Bcast(msg(part[a:b]), root=root)
