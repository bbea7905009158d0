"""A short allreduce probe: latency and bandwidth over the job's communicator, within each
host and across hosts, fitted to the ring cost model of hpcaccel.bench.costmodel.

Bounded: four sizes up to 8 MiB, a handful of repetitions each (well under a second on a
healthy fabric, a few seconds on 1 Gbit/s Ethernet).

Cross-rank invariants: `run` is collective over `comm`; every rank calls the same
Split/Split_type in the same order. Within-host probes run on each host's shared-memory
communicator at once (hosts do not interfere); the across-hosts probe runs on one rank per
host while the others go straight to the final gather.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..bench import costmodel

SIZES = (8, 64 << 10, 1 << 20, 8 << 20)  # bytes
REPS = {8: 20, 64 << 10: 10, 1 << 20: 5, 8 << 20: 3}


@dataclass(frozen=True)
class Link:
    name: str                              # "world", "within host X", "across hosts"
    ranks: int
    samples: tuple[tuple[int, float], ...]  # (bytes, seconds) per size

    @property
    def latency_s(self) -> float:
        return self.samples[0][1]

    @property
    def busbw(self) -> float:
        """Bytes/s each rank moves at the largest size (the ring's 2(p-1)/p n bytes)."""
        n, t = self.samples[-1]
        return 2 * (self.ranks - 1) / self.ranks * n / t

    def line(self) -> str:
        return (f"{self.name} ({self.ranks} ranks): latency {self.latency_s * 1e6:.1f} us, "
                f"bandwidth {self.busbw / 1e9:.2f} GB/s (bus, at {self.samples[-1][0] >> 20} MiB)")


def time_allreduce(comm, nbytes: int, reps: int) -> float:
    """Collective over comm. Seconds per in-place float32 MPI_Allreduce of nbytes: the
    slowest rank's time, best of `reps` after one warm-up call (which sets up connections)."""
    from mpi4py import MPI

    buf = np.ones(max(1, nbytes // 4), dtype=np.float32)
    comm.Allreduce(MPI.IN_PLACE, buf)
    best = float("inf")
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf)
        best = min(best, comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return best


def probe(comm, name: str) -> Link:
    """Collective over comm."""
    return Link(name, comm.Get_size(),
                tuple((n, time_allreduce(comm, n, REPS[n])) for n in SIZES))


def reduction_gamma(nbytes: int = 8 << 20) -> float:
    """Local. Seconds per byte of adding two float32 arrays (the model's gamma)."""
    a, b = np.ones(nbytes // 4, np.float32), np.ones(nbytes // 4, np.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.add(a, b, out=a)
        best = min(best, time.perf_counter() - t0)
    return best / nbytes


def run(comm, local_rank: int, nodes: int) -> list[Link] | None:
    """Collective. The links probed (on rank 0; None elsewhere): the world, each host with
    more than one rank, and one rank per host when there are several hosts."""
    from mpi4py import MPI

    mine = []
    if comm.Get_size() > 1:
        link = probe(comm, "world")
        if comm.Get_rank() == 0:
            mine.append(link)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        if nodes > 1 and local.Get_size() > 1:
            link = probe(local, f"within host {MPI.Get_processor_name()}")
            if local.Get_rank() == 0:
                mine.append(link)
    finally:
        local.Free()
    leaders = comm.Split(0 if local_rank == 0 else MPI.UNDEFINED, key=comm.Get_rank())
    if leaders != MPI.COMM_NULL:
        try:
            if leaders.Get_size() > 1:
                link = probe(leaders, "across hosts, one rank per host")
                if leaders.Get_rank() == 0:
                    mine.append(link)
        finally:
            leaders.Free()
    gathered = comm.gather(mine, root=0)
    return None if gathered is None else [link for links in gathered for link in links]


def model_link(links: list[Link]) -> Link | None:
    """The link the ring model describes: one rank per host across hosts where there are
    several hosts (the network), else the whole world."""
    for link in links:
        if link.name.startswith("across"):
            return link
    return next((link for link in links if link.name == "world"), None)


def prediction(link: Link, gamma: float, grad_mb: float, compute_ms: float) -> list[str]:
    """What `python -m hpcaccel.bench predict` expects with alpha and beta fitted to `link`."""
    alpha, beta = costmodel.fit([(link.ranks, n, t) for n, t in link.samples], gamma)
    lines = [f"predicted with alpha {alpha * 1e6:.2f} us, beta {beta * 1e9:.3f} ns/B "
             f"(fitted to {link.name}), gamma {gamma * 1e9:.3f} ns/B (measured here), "
             f"gradient {grad_mb:g} MiB, compute {compute_ms:g} ms per step:",
             "| ranks | allreduce (ms) | step (ms) | efficiency |", "| --- | --- | --- | --- |"]
    for row in costmodel.predict_table(compute_ms / 1e3, grad_mb * 2**20, alpha, beta, gamma):
        lines.append(f"| {row['ranks']} | {row['allreduce_s'] * 1e3:.2f} | "
                     f"{row['step_s'] * 1e3:.1f} | {row['efficiency']:.0%} |")
    return lines
