"""--bucket-mb auto: the mpi reducer's bucket size from the link it runs on.

A bucket costs a fixed latency `a` per allreduce (messages, the algorithm's rounds, the
reducer's hand-off) plus its bytes over the bandwidth `bw`. Over a gradient of G bytes in
buckets of b bytes:
  * the latencies add up to G/b * a: small buckets waste the link;
  * the last bucket closes when backward ends and its transfer, about b/bw, cannot hide
    behind compute: large buckets leave the link idle during backward and then expose it.
The sum G·a/b + b/bw is smallest at b = sqrt(G · a · bw) (the classic pipelining optimum),
and b is kept at least large enough that latency is at most 5% of a bucket's time. Powers
of two from 1 to 256 MiB, so small measurement noise does not move the choice.

`a` and `bw` are measured at start-up through the reducer's own algorithm on its own
communicator, so they are the link and the code path the buckets will actually use
(shared memory on one host, the pipelined ring across hosts, whose fixed cost per call is
milliseconds where the library's small allreduce takes microseconds): `bw` is 8 MiB over
an 8 MiB allreduce's time, `a` what a 1 MiB allreduce takes beyond 1 MiB at that rate, and
at least an 8-byte allreduce's time. Each is the slowest rank's time, best of several
calls.

Within one host the size stays ONE_HOST_BYTES (25 MiB) and nothing is measured: over
shared memory 1, 4 and 25 MiB trained equally fast (docs/benchmarks.md), while the probe's
latency there varied 30x with the machine's load (8-230 us), so a measured choice would
change between identical runs, and with it the order of additions. Across hosts the link
dominates and the measurement is stable (1 MiB in every run at 2 x 1 over 1 Gbit/s).

Cross-rank invariant: the timings are reduced with MAX before anything is derived from
them, so every rank computes the same size and plans the same buckets. A resumed run
takes the size from its checkpoint (MPIReducer.load_state_dict): the bucket layout decides
the order of additions, and a resumed run must add in the same order to stay bit-identical.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..wording import mib

MIB = 1 << 20
PROBE_BYTES = (8, 1 * MIB, 8 * MIB)
PROBE_REPS = {8: 10, 1 * MIB: 10, 8 * MIB: 5}
LATENCY_SHARE = 0.05  # latency at most this fraction of a bucket's time
SMALLEST, LARGEST = 1 * MIB, 256 * MIB
ONE_HOST_BYTES = 25 * MIB


def fit_link(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """Pure. (latency s, bandwidth B/s) of T(n) = a + n / bw from (bytes, seconds) samples
    of three sizes: bw is the largest size over its time (the latency in it makes bw a
    little low, and a a little low with it: the safe side), a the middle size's time beyond
    its bytes at bw, and never below the smallest size's time."""
    (n0, t0), (n1, t1), (n2, t2) = sorted(samples)
    bw = n2 / max(t2, 1e-12)
    return max(t0, t1 - n1 / bw), bw


def choose(grad_bytes: int, latency_s: float, bandwidth: float) -> int:
    """Pure. The bucket size in bytes for a gradient of `grad_bytes` (see the module doc)."""
    optimum = math.sqrt(max(grad_bytes, 1) * latency_s * bandwidth)
    floor = latency_s * bandwidth * (1 - LATENCY_SHARE) / LATENCY_SHARE
    size = max(optimum, floor, SMALLEST)
    power = 2 ** round(math.log2(size / MIB)) * MIB
    return int(min(max(power, SMALLEST), LARGEST))


def probe(algorithm, comm) -> list[tuple[int, float]]:
    """Collective over comm. (bytes, seconds) of algorithm.allreduce_ at PROBE_BYTES: the
    slowest rank's time of each call, best of PROBE_REPS[bytes] after one warm-up call."""
    from mpi4py import MPI

    samples = []
    for nbytes in PROBE_BYTES:
        buf = np.zeros(max(1, nbytes // 4), dtype=np.float32)
        algorithm.allreduce_(buf, MPI.SUM)  # warm-up: connections, buffers
        best = float("inf")
        for _ in range(PROBE_REPS[nbytes]):
            comm.Barrier()
            t0 = time.perf_counter()
            algorithm.allreduce_(buf, MPI.SUM)
            best = min(best, comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        samples.append((nbytes, best))
    return samples


def for_link(algorithm, comm, grad_bytes: int) -> tuple[int, tuple | None]:
    """Collective over comm. (bucket size, link) for a gradient of `grad_bytes`: across
    hosts chosen from the link measured through `algorithm` (latency s, bandwidth B/s);
    on one host ONE_HOST_BYTES, nothing measured (link None)."""
    from .hierarchical import node_layout

    local, hosts, _ = node_layout(comm)
    local.Free()
    if hosts > 1:
        link = fit_link(probe(algorithm, comm))
        return choose(grad_bytes, *link), link
    return ONE_HOST_BYTES, None


def describe(size: int, link) -> str:
    """The start-up line's phrase for an automatic size; link: (latency, bandwidth), None
    (one host) or "checkpoint" (a resumed run's)."""
    if link is None:
        return f"buckets {mib(size)} (auto: one host)"
    if link == "checkpoint":
        return f"buckets {mib(size)} (auto: the checkpoint's)"
    return (f"buckets {mib(size)} (auto: latency {link[0] * 1e6:.0f} us, "
            f"{link[1] / 1e9:.2f} GB/s)")
