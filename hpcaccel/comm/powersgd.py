"""PowerSGD gradient compression with error feedback (Vogels, Karimireddy, Jaggi, NeurIPS 2019).

Each matrix-shaped gradient M (n x m; conv kernels as out x rest) is sent as rank-r factors:

  M += error          error feedback: what earlier steps' approximations left out
  P  = M Q            Q (m x r) warm-started from the previous step
  allreduce(P)        one buffer for a whole group of matrices (+ any extra numbers)
  P  = orth(P)        orthonormal columns (Householder QR)
  Q  = M^T P
  allreduce(Q)        Q is kept: next step's warm start
  G  = P Q^T / world  the averaged approximation, the same on every rank
  error = M - G       local

(n + m) r numbers travel instead of n m. The algorithm only needs a callable that sums a
contiguous tensor in place across ranks; the mpi reducer passes its allreduce algorithm.
Tensors where compression saves little (biases, norms, thin matrices) are not its business:
the caller allreduces them uncompressed (see `compressible`).

Cross-rank invariants:
  * Every rank registers the same groups (same keys, shapes, order) and calls average_ on
    them in the same order with the same `extra` length, so the allreduces match.
  * Q starts from a generator seeded by (seed, key), identical everywhere; after that P and
    Q are sums over ranks, identical everywhere, and the orthogonalisation and G are the same
    torch operations on identical inputs: every rank ends with bitwise the same G (same torch
    build and intra-op thread count on every rank, as env.detect sets for ranks bound alike).
  * The error buffers differ per rank (they hold each rank's own residual); a checkpoint must
    keep every rank's state_dict, not one.
"""
from __future__ import annotations

from typing import Callable

import torch

MIN_COMPRESSION = 2.0  # compress only if the factors are at most half the matrix


def matrix_shape(shape) -> tuple[int, int]:
    """The 2-d view PowerSGD compresses: (first dimension, product of the rest)."""
    n = int(shape[0])
    m = 1
    for s in shape[1:]:
        m *= int(s)
    return n, m


def compressible(shape, rank: int, min_compression: float = MIN_COMPRESSION) -> bool:
    """Pure. Whether a tensor of `shape` is worth sending as rank-`rank` factors: at least
    2-d and (n + m) * rank * min_compression <= n * m."""
    if len(shape) < 2:
        return False
    n, m = matrix_shape(shape)
    return (n + m) * rank * min_compression <= n * m


def orthogonalize_(p: torch.Tensor) -> torch.Tensor:
    """Replace p's columns by an orthonormal basis of their span, in place. Householder QR:
    columns stay orthonormal even when p is rank-deficient (a zero or repeated column), so
    no epsilon and no NaN."""
    q, _ = torch.linalg.qr(p, mode="reduced")
    p.copy_(q)
    return p


class _Group:
    """Matrices compressed together: one P buffer (plus `extra` slots) and one Q buffer."""

    def __init__(self, keys, shapes, rank, extra, device, dtype, seed):
        self.keys = list(keys)
        self.dims = [matrix_shape(s) for s in shapes]
        self.ranks = [min(rank, n, m) for n, m in self.dims]
        p_sizes = [n * r for (n, _), r in zip(self.dims, self.ranks)]
        q_sizes = [m * r for (_, m), r in zip(self.dims, self.ranks)]
        self.p_flat = torch.zeros(sum(p_sizes) + extra, dtype=dtype, device=device)
        self.q_flat = torch.zeros(sum(q_sizes), dtype=dtype, device=device)
        self.extra = self.p_flat[sum(p_sizes):]
        self.p, self.q, self.error = [], [], []
        po = qo = 0
        for (n, m), r, ps, qs, key in zip(self.dims, self.ranks, p_sizes, q_sizes, self.keys):
            self.p.append(self.p_flat[po:po + ps].view(n, r))
            # Q kept transposed (r x m, contiguous): P = M Q and Q^T = P^T M then run as
            # fast row-major products (an m x r target made Q = M^T P 10x slower, measured)
            self.q.append(self.q_flat[qo:qo + qs].view(r, m))
            po, qo = po + ps, qo + qs
            self.error.append(torch.zeros(n * m, dtype=dtype, device=device).view(n, m))
        for key, q in zip(self.keys, self.q):
            init_q_(q, seed, key)


def init_q_(qt: torch.Tensor, seed: int, key: int) -> None:
    """Deterministic start of a warm-started Q (given as Q^T, r x m): normal from
    (seed, key), columns of Q orthonormalised."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + key)
    q = torch.randn(qt.t().shape, generator=g, dtype=torch.float64)
    qt.copy_(orthogonalize_(q).t().to(qt.dtype))


class PowerSGD:
    """Rank-`rank` compression with error feedback over groups of matrices.

    world_size: ranks summing in `allreduce` (the mean divides by it). start_step: the caller
    allreduces exactly while `active` is False (the first start_step steps, counted by
    end_step()); error feedback and Q start with the first compressed step.
    """

    def __init__(self, world_size: int, rank: int = 4, start_step: int = 0, seed: int = 0):
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if start_step < 0:
            raise ValueError(f"start_step must not be negative, got {start_step}")
        self.world_size, self.rank, self.start_step, self.seed = world_size, rank, start_step, seed
        self.step = 0
        self.groups: list[_Group] = []
        self._by_key: dict[int, tuple[_Group, int]] = {}

    @property
    def active(self) -> bool:
        return self.step >= self.start_step

    def end_step(self) -> None:
        """Count one optimizer step (the caller calls it once per step on every rank)."""
        self.step += 1

    def add_group(self, keys, shapes, extra: int = 0, device="cpu",
                  dtype=torch.float32) -> int:
        """Register matrices (unique int keys, their shapes) compressed together; `extra`
        more numbers ride along with P. Returns the group's index."""
        group = _Group(keys, shapes, self.rank, extra, torch.device(device), dtype, self.seed)
        for i, key in enumerate(group.keys):
            if key in self._by_key:
                raise ValueError(f"key {key} registered twice")
            self._by_key[key] = (group, i)
        self.groups.append(group)
        return len(self.groups) - 1

    def wire_numel(self, index: int) -> int:
        """Numbers that travel per step for group `index` (P, extra, Q)."""
        g = self.groups[index]
        return g.p_flat.numel() + g.q_flat.numel()

    def average_(self, index: int, grads: list[torch.Tensor],
                 allreduce: Callable[[torch.Tensor], None], extra: torch.Tensor | None = None,
                 skip: Callable[[torch.Tensor], list] | None = None) -> torch.Tensor | None:
        """Replace each of group `index`'s gradients (shaped like the registered shapes,
        contiguous) by the rank-r approximation of their mean over ranks, in place.

        extra: numbers summed with P (copied in and the sum copied back out). skip: called
        with the summed extra, returns per-matrix flags (the same on every rank, being made
        from a sum); a matrix flagged True keeps its error feedback and Q, and its gradient
        is left meaningless for the caller to discard (a parameter no rank produced a
        gradient for). Returns the summed extra."""
        g = self.groups[index]
        ms = [grad.view(n, m) for grad, (n, m) in zip(grads, g.dims)]
        for mat, err, p, qt in zip(ms, g.error, g.p, g.q):
            mat.add_(err)
            torch.mm(mat, qt.t(), out=p)
        if extra is not None:
            g.extra.copy_(extra)
        allreduce(g.p_flat)
        skipped = skip(g.extra) if skip is not None else [False] * len(ms)
        for mat, p, qt, s in zip(ms, g.p, g.q, skipped):
            if s:
                continue  # Q stays as it was: summed as zeros below would lose the warm start
            orthogonalize_(p)
            torch.mm(p.t(), mat, out=qt)
        saved = [q.clone() for q, s in zip(g.q, skipped) if s]
        for q, s in zip(g.q, skipped):
            if s:
                q.zero_()
        allreduce(g.q_flat)
        it = iter(saved)
        for mat, err, p, qt, s in zip(ms, g.error, g.p, g.q, skipped):
            if s:
                qt.copy_(next(it))  # error feedback untouched; the caller drops this gradient
                continue
            mean_qt = qt / self.world_size  # r x m: dividing the small factor, not the product
            torch.addmm(mat, p, mean_qt, alpha=-1, out=err)  # error = M - P Q^T / world
            torch.mm(p, mean_qt, out=mat)  # from identical P and Q: the same on every rank
        return None if extra is None else g.extra.clone()

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state: the step count and, per key, the error feedback and Q^T."""
        params = {}
        for g in self.groups:
            for key, err, q in zip(g.keys, g.error, g.q):
                params[key] = {"error": err.detach().cpu().clone(), "q": q.detach().cpu().clone()}
        return {"step": self.step, "rank": self.rank, "params": params}

    def load_state_dict(self, state: dict, errors: bool = True) -> None:
        """Restore a state_dict. errors=False keeps only the step and Q (identical on every
        rank), e.g. when the world size changed and the per-rank residuals mean nothing."""
        self.step = int(state["step"])
        for key, saved in state["params"].items():
            if key not in self._by_key:
                if not errors:
                    continue  # another world size; a one-rank run compresses nothing
                raise ValueError(f"PowerSGD state for unknown key {key}")
            g, i = self._by_key[key]
            if errors:
                g.error[i].copy_(saved["error"])
            if saved["q"].shape == g.q[i].shape:  # else a different rank: Q starts afresh
                g.q[i].copy_(saved["q"])
