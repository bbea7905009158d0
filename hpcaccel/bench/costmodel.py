"""The alpha-beta-gamma cost model of ring allreduce, fitted to measurements. Pure.

Ring allreduce of n bytes over p ranks (Thakur, Rabenseifner and Gropp, "Optimization of
Collective Communication Operations in MPICH", 2005) is a reduce-scatter then an allgather,
each of p-1 steps moving n/p bytes:

    T(p, n) = 2(p-1)·alpha + 2(p-1)/p·n·beta + (p-1)/p·n·gamma

alpha: latency per message (s); beta: transfer time per byte (s/B, 1/bandwidth);
gamma: reduction (addition) time per byte (s/B).

Assumptions, stated because predictions are only as good as they are:
  * one rank per node on the network presets (intra-node traffic is not modelled), a
    non-blocking fabric, and the bandwidth of one link per rank;
  * gamma is a local property (memory-bound addition) measured on this machine; beta and
    gamma cannot be separated from one machine's measurements (both scale like (p-1)/p·n),
    so gamma is fixed first and alpha, beta are fitted;
  * a training step is compute C plus the part of the allreduce not hidden behind backward:
    `overlap` 0 (nothing hidden) to 1 (all hidden up to C).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Network:
    name: str
    alpha: float  # s per message
    beta: float   # s per byte


# Conservative figures for MPI over each fabric (latency as seen by MPI, not the wire).
PRESETS = {
    "25gbe": Network("25 GbE (TCP)", alpha=25e-6, beta=8 / 25e9),
    "ib100": Network("100 Gb/s InfiniBand (EDR)", alpha=2e-6, beta=8 / 100e9),
}


def ring_time(p: int, n: float, alpha: float, beta: float, gamma: float) -> float:
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta + (p - 1) / p * n * gamma


def fit(samples, gamma: float) -> tuple[float, float]:
    """Fit alpha, beta >= 0 to (p, n_bytes, seconds) samples with gamma fixed, minimising
    relative error (so 4-byte latencies weigh as much as 64 MiB transfers)."""
    rows, rhs = [], []
    for p, n, t in samples:
        if p <= 1 or t <= 0:
            continue
        rows.append([2 * (p - 1) / t, 2 * (p - 1) / p * n / t])
        rhs.append(1 - (p - 1) / p * n * gamma / t)
    if len(rows) < 2:
        raise ValueError("need at least two measurements with p > 1 to fit alpha and beta")
    A, b = np.asarray(rows), np.asarray(rhs)
    (alpha, beta), *_ = np.linalg.lstsq(A, b, rcond=None)
    # noise can push a term slightly negative; keep the model physical
    return max(0.0, float(alpha)), max(0.0, float(beta))


def step_time(compute_s: float, grad_bytes: float, p: int, alpha: float, beta: float,
              gamma: float, overlap: float = 0.0) -> float:
    comm = ring_time(p, grad_bytes, alpha, beta, gamma)
    hidden = min(comm, overlap * compute_s)
    return compute_s + comm - hidden


def efficiency(compute_s: float, grad_bytes: float, p: int, alpha: float, beta: float,
               gamma: float, overlap: float = 0.0) -> float:
    """Weak-scaling efficiency: per-rank throughput at p relative to one rank."""
    return compute_s / step_time(compute_s, grad_bytes, p, alpha, beta, gamma, overlap)


def predict_table(compute_s: float, grad_bytes: float, alpha: float, beta: float, gamma: float,
                  ranks=(2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), overlap: float = 0.0) -> list[dict]:
    out = []
    for p in ranks:
        t = step_time(compute_s, grad_bytes, p, alpha, beta, gamma, overlap)
        out.append({"ranks": p, "allreduce_s": ring_time(p, grad_bytes, alpha, beta, gamma),
                    "step_s": t, "efficiency": compute_s / t})
    return out


# -- two levels: within a host (shared memory) and across hosts (the network) ---------------
#
# A job of H hosts x L ranks has two (alpha, beta) pairs, fitted separately: `intra` from
# allreduce measurements on one host, `inter` from ones across hosts at 1 rank per host
# (fit() of (2, n, t) samples). Assumptions beyond the ring model's: ranks are numbered host
# by host, so a flat ring crosses each host boundary once per direction and its steps run
# at the across-host rate; the L rings of the node-aware sum share their host's link.

def flat_time(hosts: int, per_host: int, n: float, intra: Network, inter: Network,
              gamma: float) -> float:
    """One ring over all H x L ranks; every step waits for its across-host hop."""
    level = inter if hosts > 1 else intra
    return ring_time(hosts * per_host, n, level.alpha, level.beta, gamma)


def hierarchical_time(hosts: int, per_host: int, n: float, intra: Network, inter: Network,
                      gamma: float) -> float:
    """Reduce part l to local rank l (L Reduce calls), a ring across the H hosts on each
    part (the L rings share the host link: 2(H-1)/H x n through it), L broadcasts."""
    L, H = per_host, hosts
    within = 0.0
    if L > 1:
        within = 2 * L * intra.alpha + 2 * (L - 1) / L * n * intra.beta + (L - 1) / L * n * gamma
    across = 0.0
    if H > 1:
        across = (2 * (H - 1) * inter.alpha + 2 * (H - 1) / H * n * inter.beta
                  + (H - 1) / H * (n / L) * gamma)
    return within + across


ALGORITHM_TIMES = {"ring": flat_time, "hierarchical": hierarchical_time}


def allreduce_time(algorithm: str, hosts: int, per_host: int, n: float, intra: Network,
                   inter: Network, gamma: float) -> float:
    """Time of one allreduce of n bytes by `algorithm` (ring: flat; hierarchical)."""
    return ALGORITHM_TIMES[algorithm](hosts, per_host, n, intra, inter, gamma)
