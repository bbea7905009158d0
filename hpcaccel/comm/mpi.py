"""hpcaccel's own reducer over mpi4py: bucketed, overlapped, zero-copy gradient allreduce.

How a step flows:
  zero_grad()   every parameter's .grad is a view into its bucket's flat buffer, zeroed.
  backward()    autograd accumulates into those views in place; a post-accumulate hook
                marks the parameter ready; when a bucket is complete, its in-place
                MPI Iallreduce is started (buckets strictly in index order, see below).
  synchronize() starts any bucket not yet started, waits for all, divides by world size.

Cross-rank invariants:
  * Buckets are laid out identically on every rank (same parameters, same order) and are
    started in index order on every rank, so nonblocking collectives always match even
    when autograd finishes buckets in a different order on different ranks.
  * Each bucket carries one "used" flag per parameter after the gradients. A parameter
    that got no gradient on this rank contributes zeros and flag 0; after the sum, a
    parameter is updated on every rank iff some rank produced a gradient for it, and
    .grad is None on every rank otherwise. No rank waits for a gradient that never comes.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .base import Reducer

_FIRST_BUCKET_BYTES = 1 << 20  # small first bucket: communication starts early in backward
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


class _Bucket:
    def __init__(self, index: int, params: list[torch.nn.Parameter]):
        self.index = index
        self.params = params
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        # gradients, then one used-flag per parameter
        self.flat = torch.zeros(total + len(params), dtype=params[0].dtype)
        self.array = self.flat.numpy()  # shares memory: MPI works on the tensor itself
        self.flags = self.flat[total:]
        self.pending = len(params)
        self.ready = [False] * len(params)
        self.request = None

    def view(self, i: int) -> torch.Tensor:
        p, start = self.params[i], self.offsets[i]
        return self.flat[start:start + p.numel()].view_as(p)

    def is_view(self, i: int, grad) -> bool:
        return (grad is not None and grad.data_ptr() == self.flat[self.offsets[i]:].data_ptr()
                and grad.shape == self.params[i].shape and grad.is_contiguous())


def plan_buckets(sizes_bytes: list[int], bucket_bytes: int,
                 first_bucket_bytes: int = _FIRST_BUCKET_BYTES) -> list[list[int]]:
    """Group parameter indices (in gradient-ready order) into buckets. Pure.

    A bucket closes once it reaches its byte cap; a parameter larger than the cap gets a
    bucket of its own. The first bucket is smaller, so the first allreduce starts early.
    """
    buckets, current, current_bytes = [], [], 0
    cap = min(first_bucket_bytes, bucket_bytes)
    for i, nbytes in enumerate(sizes_bytes):
        if current and current_bytes + nbytes > cap:
            buckets.append(current)
            current, current_bytes, cap = [], 0, bucket_bytes
        current.append(i)
        current_bytes += nbytes
    if current:
        buckets.append(current)
    return buckets


class MPIReducer(Reducer):
    name = "mpi"

    def __init__(self, comm=None, bucket_bytes: int = 25 * 2**20):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm or MPI.COMM_WORLD
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())
        self.bucket_bytes = int(bucket_bytes)
        self.buckets: list[_Bucket] = []
        self._where = {}          # parameter -> (bucket, index in bucket)
        self._next_launch = 0     # buckets [0, _next_launch) have been started this step
        self._sync = True
        self._handles = []
        self.optimizer = None

    # -- set-up ---------------------------------------------------------------------------
    def broadcast_parameters(self, module, root=0):
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                if t.is_contiguous() and t.device.type == "cpu":
                    self.comm.Bcast(t.data.numpy(), root=root)
                else:
                    host = t.detach().cpu().contiguous()
                    self.comm.Bcast(host.numpy(), root=root)
                    t.copy_(host)

    def attach(self, model, optimizer):
        self.optimizer = optimizer
        # Reverse registration order approximates the order autograd produces gradients.
        params = [p for p in reversed(list(model.parameters())) if p.requires_grad]
        for p in params:
            if p.device.type != "cpu":
                raise NotImplementedError("the mpi reducer handles CPU tensors only")
            if p.dtype not in (torch.float32, torch.float64):
                raise NotImplementedError(f"the mpi reducer handles float32/float64 "
                                          f"parameters, not {p.dtype}")
        # one dtype per bucket
        by_dtype = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            sizes = [p.numel() * p.element_size() for p in group]
            for idx in plan_buckets(sizes, self.bucket_bytes):
                self.buckets.append(_Bucket(len(self.buckets), [group[i] for i in idx]))
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self._where[p] = (b, i)
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self.zero_grad()

    # -- per step -------------------------------------------------------------------------
    def zero_grad(self):
        for b in self.buckets:
            if b.request is not None:
                raise RuntimeError("zero_grad() while gradients are being reduced: "
                                   "call synchronize() first")
            b.flat.zero_()
            b.pending = len(b.params)
            b.ready = [False] * len(b.params)
            for i, p in enumerate(b.params):
                if not b.is_view(i, p.grad):
                    p.grad = b.view(i)
        self._next_launch = 0

    def _on_grad(self, p):
        b, i = self._where[p]
        if not b.is_view(i, p.grad):
            # First step, or someone replaced .grad: move it into the bucket (one copy).
            b.view(i).copy_(p.grad)
            p.grad = b.view(i)
        b.flags[i] = 1
        if not self._sync:
            return  # accumulating locally; communication happens on the last micro-step
        if b.ready[i]:
            raise RuntimeError("a parameter received a gradient twice in one step; wrap "
                               "all but the last backward in reducer.no_sync()")
        b.ready[i] = True
        b.pending -= 1
        if b.pending == 0:
            self._launch_ready()

    def _launch(self, b: _Bucket):
        b.request = self.comm.Iallreduce(self._MPI.IN_PLACE, b.array, op=self._MPI.SUM)
        self._next_launch = b.index + 1

    def _launch_ready(self):
        # Strictly in index order: a complete bucket waits for earlier ones (invariant 1).
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            self._launch(self.buckets[self._next_launch])
        # Nonblocking collectives progress only inside MPI calls: give them a nudge.
        active = [b.request for b in self.buckets[:self._next_launch] if b.request is not None]
        if active:
            self._MPI.Request.Testall(active)

    def synchronize(self):
        for b in self.buckets[self._next_launch:]:
            self._launch(b)  # incomplete buckets: missing gradients are zeros, flags 0
        requests = [b.request for b in self.buckets]
        if requests:
            self._MPI.Request.Waitall(requests)
        for b in self.buckets:
            b.request = None
            if self.size > 1:
                b.flat[:b.numel].div_(self.size)
            for i, p in enumerate(b.params):
                if b.flags[i] > 0:
                    if not b.is_view(i, p.grad):
                        p.grad = b.view(i)
                else:
                    p.grad = None  # no rank produced a gradient: skip it everywhere
            b.pending = 0

    @contextlib.contextmanager
    def no_sync(self):
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    # -- values ---------------------------------------------------------------------------
    def allreduce_array(self, values, op="sum"):
        out = np.array(values, dtype=np.float64, copy=True)
        self.comm.Allreduce(self._MPI.IN_PLACE, out, op=getattr(self._MPI, _OPS[op]))
        return out

    def broadcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def gather_object(self, obj, root=0):
        return self.comm.gather(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
