"""Optimizer state sharded across ranks (ZeRO stages 1 and 2 over MPI): the mpi reducer's
`shard` option.

Layout: every bucket's parameters live in one flat buffer of the bucket (`values`; each
parameter's .data is a view of it, so the model is unchanged to its users). Rank r owns part
r of each bucket, ring.chunk_bounds(numel, size)[r]. A "piece" is the part of one parameter
inside this rank's part of one bucket: a torch Parameter viewing those elements (the
optimizer's in-place update writes straight into the model's memory). This rank's optimizers
(`inner`, one per bucket: the user's optimizer class with the user's hyperparameters) step
its pieces only, so they hold 1/size of the state. They step bucket by bucket, the first
layer's first, each bucket's allgather starting as soon as its own step is done.

Elementwise optimizers (SGD, AdamW) give the unsharded result on their pieces. What needs a
whole parameter or all of them is summed across ranks first: LARS's per-layer norms and the
clipping norm (one small allreduce each).

Checkpoints stay unsharded: gather_state() fills the user's optimizer with the whole state
(on rank 0, for the file) and scatter_state() splits a loaded one into pieces, so a run
resumes at any world size, sharded or not.

Cross-rank invariants:
  * Pieces are a pure function of (bucket layout, rank, size): the same on every rank, and
    every element of every bucket is in exactly one rank's pieces.
  * Every collective here (norms, gathers) is called by all ranks in the same order, on the
    reducer's communicator, while its communication thread is idle.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import numpy as np
import torch

from ..config import SHARDS  # noqa: F401 - the choices, named once


@dataclass
class Piece:
    tensor: torch.nn.Parameter  # a view of the bucket's values
    bucket: object               # the mpi reducer's buckets.Bucket
    index: int                   # the parameter's index in the bucket
    start: int                   # first element, in the parameter's flat numbering
    stop: int
    shard_start: int             # first element, in this rank's part of the bucket

    @property
    def param(self):
        return self.bucket.params[self.index]


def pieces_of(buckets, rank: int, size: int) -> list[Piece]:
    """This rank's pieces of every bucket (pure apart from the views)."""
    from .ring import chunk_bounds

    pieces = []
    for b in buckets:
        lo, hi = chunk_bounds(b.numel, size)[rank]
        for i, off in enumerate(b.offsets):
            n = b.params[i].numel()
            a, z = max(lo, off), min(hi, off + n)
            if a < z:
                pieces.append(Piece(torch.nn.Parameter(b.values[a:z]), b, i, a - off, z - off,
                                    a - lo))
    return pieces


def _same_class(optimizer, groups):
    """An optimizer of `optimizer`'s class over `groups`, its constructor's keyword defaults
    taken from the user's optimizer."""
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}
    return cls(groups, **kwargs)


class ShardedOptimizer:
    """This rank's share of `optimizer` (see the module docstring). Collective methods say so."""

    def __init__(self, optimizer, buckets, comm):
        self.user, self.comm = optimizer, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._all_buckets = list(buckets)  # b.index is its position
        self.pieces = pieces_of(buckets, self.rank, self.size)
        group_of = {p: gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        # bucket index -> (its optimizer, the user's group index of each of its groups)
        self.inner: dict[int, tuple] = {}
        for b in buckets:
            by_group: dict[int, list[Piece]] = {}
            for piece in self.pieces:
                if piece.bucket is b and piece.param in group_of:  # else never stepped
                    by_group.setdefault(group_of[piece.param], []).append(piece)
            if by_group:
                index = sorted(by_group)
                groups = [{**self._settings(gi), "params": [pc.tensor for pc in by_group[gi]]}
                          for gi in index]
                self.inner[b.index] = (_same_class(optimizer, groups), index)
        # LARS: its layer-wise norms are those of whole matrices, summed across ranks.
        self.matrices = [p for b in buckets for p in b.params if p.ndim > 1]
        self._matrix_slot = {p: k for k, p in enumerate(self.matrices)}

    def _settings(self, gi: int) -> dict:
        return {k: v for k, v in self.user.param_groups[gi].items() if k != "params"}

    # -- per step ---------------------------------------------------------------------------
    def set_grads(self) -> None:
        """Local. Each piece's .grad: its part of the reduced gradient, or None where no
        rank had a gradient for the parameter."""
        for pc in self.pieces:
            b = pc.bucket
            if not b.used[pc.index]:
                pc.tensor.grad = None
                continue
            shard = b.shard_grad()
            pc.tensor.grad = shard[pc.shard_start:pc.shard_start + pc.stop - pc.start]

    def clip_grad_norm_(self, max_norm: float, params=None) -> torch.Tensor:
        """Collective. torch.nn.utils.clip_grad_norm_ over the whole gradient (or over the
        gradient of `params`, the same set on every rank): the squared norm of every piece,
        summed across ranks (optim.clip_grad_norm_: the same float32 coefficient as the
        unsharded run's)."""
        from ..optim import clip_grad_norm_

        chosen = None if params is None else {id(p) for p in params}
        return clip_grad_norm_([pc.tensor.grad for pc in self.pieces
                                if chosen is None or id(pc.param) in chosen], max_norm,
                               sum_across=lambda sq: float(self._sum([sq])[0]))

    def step(self, stepped=lambda bucket: None) -> None:
        """Collective for LARS (its norms), else local: step this rank's pieces with the
        user's current hyperparameters (lr schedule, ...), bucket by bucket in the order
        the next forward needs them (the last bucket holds the first layers), calling
        stepped(bucket) after each."""
        if hasattr(self.user, "layer_norms"):  # hpcaccel's LARS
            self._lars_norms()
        for b in reversed(self._all_buckets):
            inner, index = self.inner.get(b.index, (None, ()))
            if inner is not None:
                for group, gi in zip(inner.param_groups, index):
                    group.update(self._settings(gi))
                inner.step()
            stepped(b)

    def optimizers(self) -> list:
        """Local. This rank's optimizers, one per bucket where it has pieces."""
        return [inner for inner, _ in self.inner.values()]

    def _state_of(self, pc: Piece) -> dict:
        inner = self.inner.get(pc.bucket.index, (None,))[0]
        return inner.state.get(pc.tensor, {}) if inner is not None else {}

    def _lars_norms(self) -> None:
        sums = np.zeros(2 * len(self.matrices))
        decay = {id(p): g.get("weight_decay", 0.0) for g in self.user.param_groups for p in g["params"]}
        for pc in self.pieces:
            slot = self._matrix_slot.get(pc.param)
            if slot is None or pc.tensor.grad is None:
                continue
            w, g = pc.tensor.detach(), pc.tensor.grad
            wd = decay.get(id(pc.param), 0.0)
            if wd:
                g = g.add(w, alpha=wd)
            sums[2 * slot] += float(w.double().square().sum())
            sums[2 * slot + 1] += float(g.double().square().sum())
        norms = np.sqrt(self._sum(sums))
        layer_norms = {
            pc.tensor: (torch.tensor(norms[2 * s], dtype=pc.tensor.dtype),
                        torch.tensor(norms[2 * s + 1], dtype=pc.tensor.dtype))
            for pc in self.pieces if (s := self._matrix_slot.get(pc.param)) is not None}
        for inner in self.optimizers():
            inner.layer_norms = layer_norms

    def _sum(self, values) -> np.ndarray:
        from mpi4py import MPI
        buf = np.asarray(values, dtype=np.float64).copy()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def state_bytes(self) -> int:
        """Local. Bytes of optimizer state this rank holds (its pieces')."""
        return sum(t.numel() * t.element_size() for inner in self.optimizers()
                   for st in inner.state.values() for t in st.values() if torch.is_tensor(t))

    def has_state(self) -> bool:
        """Local. Whether this rank's optimizers hold any state yet."""
        return any(len(inner.state) for inner in self.optimizers())

    # -- checkpoints ------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathered_state(self, root: int = 0):
        """Collective. Within it the user's optimizer holds the whole, unsharded state on
        `root` (what a checkpoint saves); emptied again afterwards."""
        self._gather(root)
        try:
            yield
        finally:
            self.user.state.clear()

    def _gather(self, root: int) -> None:
        # What each piece's state holds: elementwise tensors (momentum, moments) are joined
        # across ranks; anything else (step counts) is taken from the parameter's first piece.
        mine = {}
        for pc in self.pieces:
            state = self._state_of(pc)
            if not state:
                continue
            key = (pc.bucket.index, pc.index)
            entry = mine.setdefault(key, {"elementwise": [], "other": None})
            entry["elementwise"] = sorted(k for k, v in state.items() if _elementwise(v, pc.tensor))
            if pc.start == 0:
                entry["other"] = {k: v for k, v in state.items() if not _elementwise(v, pc.tensor)}
        everyone = self.comm.allgather(mine)
        layout = {}
        for of_rank in everyone:
            for key, entry in of_rank.items():
                known = layout.setdefault(key, {"elementwise": set(), "other": None})
                known["elementwise"].update(entry["elementwise"])
                if entry["other"] is not None:
                    known["other"] = entry["other"]
        for b in self._all_buckets:
            names = sorted({n for (bi, _), e in layout.items() if bi == b.index for n in e["elementwise"]})
            for name in names:
                self._gather_tensor(b, name, layout, root)
        if self.rank == root:
            for (bi, i), entry in layout.items():
                p = self._all_buckets[bi].params[i]
                self.user.state[p].update({k: (v.clone() if torch.is_tensor(v) else v)
                                           for k, v in (entry["other"] or {}).items()})

    def _gather_tensor(self, b, name: str, layout: dict, root: int) -> None:
        from mpi4py import MPI
        from .ring import chunk_bounds

        parts = chunk_bounds(b.numel, self.size)
        lo, hi = parts[self.rank]
        local = torch.zeros(hi - lo, dtype=b.values.dtype)
        for pc in self.pieces:
            if pc.bucket is b:
                value = self._state_of(pc).get(name)
                if value is not None:
                    local[pc.shard_start:pc.shard_start + pc.stop - pc.start] = value.reshape(-1)
        whole = torch.empty(b.numel, dtype=b.values.dtype) if self.rank == root else None
        counts = [z - a for a, z in parts]
        displs = [a for a, _ in parts]
        self.comm.Gatherv(local.numpy(), None if whole is None else
                          [whole.numpy(), (counts, displs), MPI._typedict[local.numpy().dtype.char]],
                          root=root)
        if whole is None:
            return
        for i, p in enumerate(b.params):
            entry = layout.get((b.index, i))
            if entry is not None and name in entry["elementwise"]:
                off = b.offsets[i]
                self.user.state[p][name] = whole[off:off + p.numel()].view_as(p).clone()

    def scatter_state(self) -> None:
        """Local. The user's optimizer holds a whole state (loaded from a checkpoint on
        every rank): keep this rank's pieces of it, then empty the user's optimizer."""
        for pc in self.pieces:
            saved = self.user.state.get(pc.param)
            inner = self.inner.get(pc.bucket.index, (None,))[0]
            if saved and inner is not None:
                inner.state[pc.tensor] = {
                    k: (v.reshape(-1)[pc.start:pc.stop].clone() if _elementwise(v, pc.param)
                        else (v.clone() if torch.is_tensor(v) else v)) for k, v in saved.items()}
        self.user.state.clear()


def _elementwise(value, like: torch.Tensor) -> bool:
    """A state entry with one value per element of the tensor it belongs to."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == like.shape
