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
communicator, so they are the link the buckets will actually use (shared memory on one
host, the network across hosts): `a` is the time of an 8-byte allreduce, `bw` the bytes of
an 8 MiB one over its time less `a`; each the slowest rank's time, best of several calls.
(An intercept fitted through two large sizes swung by 30x between runs on a loaded
machine; a small message measures the latency directly.)

Cross-rank invariant: the timings are reduced with MAX before anything is derived from
them, so every rank computes the same size and plans the same buckets. A resumed run
takes the size from its checkpoint (MPIReducer.load_state_dict): the bucket layout decides
the order of additions, and a resumed run must add in the same order to stay bit-identical.
"""
from __future__ import annotations

import math
import time

import numpy as np

MIB = 1 << 20
PROBE_BYTES = (8, 8 * MIB)
PROBE_REPS = {8: 10, 8 * MIB: 3}
LATENCY_SHARE = 0.05  # latency at most this fraction of a bucket's time
SMALLEST, LARGEST = 1 * MIB, 256 * MIB


def fit_link(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """Pure. (latency s, bandwidth B/s) of T(n) = a + n / bw from (bytes, seconds) samples:
    a is the smallest size's time, bw the largest size's bytes over its time less a (all
    of its time where noise made it look no slower than the latency)."""
    (n1, t1), (n2, t2) = min(samples), max(samples)
    transfer = t2 - t1 if t2 > 2 * t1 else t2
    return t1, n2 / max(transfer, 1e-12)


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


def describe(size: int, latency_s: float, bandwidth: float) -> str:
    return (f"buckets {size // MIB} MiB (auto: latency {latency_s * 1e6:.0f} us, "
            f"{bandwidth / 1e9:.2f} GB/s)")
