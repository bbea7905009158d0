"""Pipelined ring allreduce over point-to-point messages (reduce-scatter, then allgather).

Why (measured, docs/benchmarks.md "Across hosts"): across hosts Open MPI 4.1's
MPI_Allreduce over TCP moved 4-64 MiB at about half the link rate at 2 hosts, and so did a
plain Sendrecv of 16-64 MiB both ways at once, while one direction alone reached 0.9 x. A
large message goes by rendezvous: the receiver's go-ahead travels back on the same TCP
connection, queued behind that rank's own outgoing data (socket buffer plus the link's
queue, tens of ms), so each direction keeps waiting on the other. Here every segment is
below the TCP transport's eager limit (64 KiB in Open MPI): it leaves without a handshake,
nothing flows against the data, and both directions stream at the link rate. Each segment
is forwarded to the next rank as soon as it arrived (and was reduced), so the link never
waits for a whole chunk. Bandwidth-optimal: each rank sends and receives 2(p-1)/p of the
buffer (Patarasuk and Yuan 2009; Thakur, Rabenseifner and Gropp 2005). Within one host
the library's own allreduce is faster (shared memory): algorithms.py keeps it there.

Cross-rank invariants:
  * Collective over its communicator (a private duplicate, so its messages never match
    anyone else's): every rank calls allreduce_ with buffers of the same length, dtype and
    op, in the same order. Chunk and segment boundaries are a pure function of
    (length, world size, segment size), identical on every rank, so every send has
    exactly one matching receive of the same size.
  * Rank r sends only to (r + 1) % p and receives only from (r - 1) % p; messages between
    one pair on one tag arrive in the order sent (MPI's non-overtaking rule), so segments
    need no sequence numbers.
  * In place: afterwards the buffer holds the same values on every rank: the reduced chunk
    c is computed once, by rank (c - 1) % p, and copied to all others unchanged, so ranks
    agree bit for bit even for non-associative sums.
  * Only one thread calls it at a time (the reducer's communication thread during a step).
"""
from __future__ import annotations

import time

import numpy as np

# One message per segment, all of a chunk in flight at once. Below Open MPI's TCP eager
# limit (btl_tcp_eager_limit, 64 KiB with headers): no rendezvous. Measured at 2 hosts,
# 1 Gbit/s: 16-63 KiB all within noise (0.8-0.94 x link at 4-64 MiB); 1 MiB (rendezvous)
# 0.55-0.7 x. Per-message cost (an Isend, a Wait: ~10 us) stays < 5% at 1-10 Gbit/s.
SEGMENT_BYTES = 48 << 10
# Below this a buffer goes through the library's MPI_Allreduce: one small message is
# latency-bound, and there the library's single exchange (0.07 ms for 64 KiB across the
# emulated hosts) beats 2(p-1) ring steps driven from Python (~20 ms measured, loaded).
SMALL_BYTES = 256 << 10
# Waiting for a segment: test, then sleep this long, instead of spinning inside MPI_Wait.
# The communication thread runs beside backward on the same cores; a spinning wait takes a
# core from compute for the whole transfer (gloo's threads block in the kernel instead).
# The kernel's socket buffers (MBs) carry the link meanwhile: at 1-25 Gbit/s 0.1 ms is
# a few hundred KB at most. 0: spin in MPI_Wait.
POLL_SECONDS = 1e-4
_TAG = 1313


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) of `parts` nearly equal consecutive chunks of n elements (pure)."""
    q, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + q + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def segment_bounds(start: int, stop: int, seg: int) -> list[tuple[int, int]]:
    return [(s, min(s + seg, stop)) for s in range(start, stop, seg)]


def _parts_layout(buf, parts):
    array, rest = (buf[0], buf[1:]) if isinstance(buf, list) else (buf, [])
    counts = [hi - lo for lo, hi in parts]
    return array, rest, counts, [lo for lo, _ in parts]


def library_reduce_scatter(comm, buf, op, parts) -> None:
    """The MPI library's MPI_Reduce_scatter: part `rank` of `parts` of the 1-d array (or
    [array, datatype]) gets the sum over ranks, in place; the rest is left as it was.
    Through a scratch copy of the part: MPI's in-place form would put it at the start."""
    import numpy as np
    array, rest, counts, _ = _parts_layout(buf, parts)
    lo, hi = parts[comm.Get_rank()]
    out = np.empty(hi - lo, array.dtype)
    comm.Reduce_scatter([array, *rest] if rest else array, [out, *rest] if rest else out,
                        counts, op=op)
    array[lo:hi] = out


def library_allgather(comm, buf, parts) -> None:
    """The MPI library's MPI_Allgatherv in place: every rank's part `rank` of `parts` copied
    to all ranks."""
    from mpi4py import MPI
    array, rest, counts, displs = _parts_layout(buf, parts)
    comm.Allgatherv(MPI.IN_PLACE, [array, (counts, displs), *rest])


class RingAllreduce:
    """Ring reduce-scatter + allgather over Isend/Irecv with pipelined eager segments.
    Collective at construction (duplicates the communicator)."""

    name = "ring"

    def __init__(self, comm, segment_bytes: int = SEGMENT_BYTES, small_bytes: int = SMALL_BYTES):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm.Dup()
        self.size, self.rank = self.comm.Get_size(), self.comm.Get_rank()
        self.segment_bytes = int(segment_bytes)
        self.small_bytes = int(small_bytes)
        self.poll_seconds = POLL_SECONDS
        self._scratch = np.empty(0, np.uint8)

    def describe(self) -> str:
        return f"ring ({self.segment_bytes >> 10} KiB segments)"

    def close(self) -> None:
        """Local. Free the private communicator; idempotent."""
        if self.comm != self._MPI.COMM_NULL:
            self.comm.Free()

    def allreduce_(self, buf, op) -> None:
        """Sum (or `op`) a 1-d array, or [array, MPI datatype], in place over the ranks."""
        array = buf[0] if isinstance(buf, list) else buf
        if self.size == 1 or len(array) == 0:
            return
        if len(array) < self.size or array.nbytes < self.small_bytes:  # latency-bound
            self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=op)
            return
        self._ring(buf, op, chunk_bounds(len(array), self.size), 0, 2 * (self.size - 1))

    # The two halves, for sharded optimizers (sharding.py): rank r owns part r of
    # chunk_bounds(len, p). The ring computes the reduced chunk c on rank (c - 1) % p, so
    # its chunks are the parts rotated by one.
    def reduce_scatter_(self, buf, op) -> None:
        """Afterwards part `rank` of chunk_bounds(len, size) holds the sum over ranks; the
        rest of the buffer is scratch."""
        array = buf[0] if isinstance(buf, list) else buf
        p = self.size
        if p == 1 or len(array) == 0:
            return
        parts = chunk_bounds(len(array), p)
        if len(array) < p or array.nbytes < self.small_bytes:
            library_reduce_scatter(self.comm, buf, op, parts)
            return
        self._ring(buf, op, [parts[(c - 1) % p] for c in range(p)], 0, p - 1)

    def allgather_(self, buf) -> None:
        """Every rank's part `rank` of chunk_bounds(len, size) copied to all ranks, in place."""
        array = buf[0] if isinstance(buf, list) else buf
        p = self.size
        if p == 1 or len(array) == 0:
            return
        parts = chunk_bounds(len(array), p)
        if len(array) < p or array.nbytes < self.small_bytes:
            library_allgather(self.comm, buf, parts)
            return
        self._ring(buf, None, [parts[(c - 1) % p] for c in range(p)], p - 1, 2 * (p - 1))

    def _ring(self, buf, op, chunks, first: int, stop: int) -> None:
        """Ring steps [first, stop) over `chunks`: steps 0..p-2 reduce-scatter (chunk c
        ends reduced on rank (c - 1) % p), steps p-1..2p-3 allgather."""
        array, datatype = (buf[0], buf[1]) if isinstance(buf, list) else (buf, None)
        p = self.size
        msg = (lambda a: a) if datatype is None else (lambda a: [a, datatype])
        seg = max(1, self.segment_bytes // array.itemsize)
        width = max(hi - lo for lo, hi in chunks)
        scratch = self._scratch_for(array, 2 * width) if first < p - 1 else None
        right, left, r = (self.rank + 1) % p, (self.rank - 1) % p, self.rank

        def incoming(t):  # chunk received at step t (reduce-scatter: t < p - 1, then allgather)
            return chunks[(r - t - 1) % p]

        def post_recvs(t):  # reduce-scatter steps land in scratch, allgather in place
            lo, hi = incoming(t)
            if t < p - 1:
                base = (t % 2) * width - lo
                return [(a, b, self.comm.Irecv(msg(scratch[base + a:base + b]), left, _TAG))
                        for a, b in segment_bounds(lo, hi, seg)]
            return [(a, b, self.comm.Irecv(msg(array[a:b]), left, _TAG))
                    for a, b in segment_bounds(lo, hi, seg)]

        # Step t sends chunk out(t) = chunks[(r - t) % p] and receives incoming(t), which is
        # out(t + 1): each segment goes on to the right as soon as it arrived (and was
        # reduced), in arrival order == the order it was sent, so the link never waits for a
        # whole chunk. sends[t] are the requests of out(t).
        sends = [[] for _ in range(2 * (p - 1))]
        sends[first] = [self.comm.Isend(msg(array[a:b]), right, _TAG)
                        for a, b in segment_bounds(*chunks[(r - first) % p], seg)]
        pending = post_recvs(first)
        for t in range(first, stop):
            # Reduce-scatter receives are posted a step ahead (into the other scratch half).
            # An allgather step u receives into out(u + 1 - p)'s memory: posted only once
            # those sends completed (MPI: a send buffer is not written while in flight).
            if t >= p - 1:
                for request in sends[t + 1 - p]:
                    self._wait(request)
                if t > first:
                    pending = post_recvs(t)
            following = post_recvs(t + 1) if t + 1 < min(p - 1, stop) else []
            base = (t % 2) * width - incoming(t)[0]
            for a, b, req in pending:
                self._wait(req)
                if t < p - 1:
                    op.Reduce_local(msg(scratch[base + a:base + b]), msg(array[a:b]))
                if t + 1 < stop:
                    sends[t + 1].append(self.comm.Isend(msg(array[a:b]), right, _TAG))
            pending = following
        for requests in sends:
            for request in requests:
                self._wait(request)

    def _wait(self, request) -> None:
        if self.poll_seconds <= 0:
            request.Wait()
            return
        while not request.Test():
            time.sleep(self.poll_seconds)

    def _scratch_for(self, array, n):
        need = n * array.itemsize
        if self._scratch.nbytes < need:
            self._scratch = np.empty(need, np.uint8)
        return self._scratch[:need].view(array.dtype)
