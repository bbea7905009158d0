"""The mpi reducer's buckets: gradients laid out in flat buffers, and the plan of them.

A bucket is one flat buffer: its parameters' gradients, in order, then one "used" flag per
parameter (this rank had a gradient for it; after the sum, how many ranks had). Each
parameter's .grad is a view of its slice. MPI reduces the bucket's own memory on CPU (zero
copy), or a wire copy (wire.py): a pinned host copy of a GPU bucket, or a 16-bit copy when
compressed. With shard gradients a bucket has no buffer of its own: one is lent to it for
a step (sharded_step.py).

The plan (`make_buckets`): the parameters, in the order autograd is expected to produce
their gradients, are grouped by device, dtype and kind (matrices PowerSGD compresses get
buckets of their own), and each group is cut at the bucket size (`plan_buckets`), the first
bucket smaller so that communication starts early in backward. Buckets are numbered in the
order their last gradients are expected: buckets of different kinds interleave, so a small
bucket of biases does not hold back the matrices.

Cross-rank invariant: the plan is local and the same on every rank (same parameters, same
order, same size, hence the same buckets with the same indices), so that buckets started in
index order (overlap.py) match on every rank.
"""
from __future__ import annotations

import threading

import torch

from . import powersgd

FIRST_BUCKET_BYTES = 1 << 20  # small first bucket: communication starts early in backward


class Bucket:
    def __init__(self, index: int, params: list[torch.nn.Parameter], wire_dtype=None,
                 lazy: bool = False):
        """lazy: no gradient buffer of its own; bind() lends one for a step (shard
        gradients)."""
        self.index = index
        self.params = params
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        # gradients, then one used-flag per parameter
        device = params[0].device
        on_host = device.type == "cpu"
        self.flat = self.flags = self.array = None
        if not lazy:
            self.bind(torch.zeros(total + len(params), dtype=params[0].dtype, device=device))
        # CPU: MPI works on the bucket's own memory (zero copy). GPU: through a pinned host
        # copy, as no CUDA-aware MPI is assumed. Compression: a 16-bit copy travels instead;
        # MPI sees its bits as int16 (wire.wire_sum_op).
        if wire_dtype is None and not on_host:
            wire_dtype = self.flat.dtype
        self.wire = None if wire_dtype is None else torch.zeros(
            len(self.flat), dtype=wire_dtype, pin_memory=not on_host)
        self.wire_16bit = self.wire is not None and self.wire.element_size() == 2
        self.wire_array = None if self.wire is None else (
            self.wire.view(torch.int16) if self.wire_16bit else self.wire).numpy()
        self.new_step()
        self.psgd = None          # compression powersgd: the PowerSGD group of this bucket
        self.request = None       # overlap=nonblocking: the MPI request
        self.done = threading.Event()  # overlap=thread: set by the communication thread
        # sharding: the parameters' values (each .data a view), this rank's part of them,
        # the used flags after the sum, this rank's reduced gradient (shard gradients), and
        # whether the values are complete (cleared while their allgather is in flight)
        self.values = None
        self.part = (0, total)
        self.used = [True] * len(params)
        self.kept = None
        self.local_flags = None  # this rank's used flags of the step (sharding)
        self.gathered = threading.Event()
        self.gathered.set()

    def new_step(self) -> None:
        """Forget the step's bookkeeping: no parameter ready, no gradient counted."""
        self.pending = len(self.params)
        self.ready = [False] * len(self.params)
        self.touched = [False] * len(self.params)  # got a gradient on this rank this step
        self.passes = [0] * len(self.params)       # gradients counted toward ready this step

    def bind(self, flat: torch.Tensor) -> None:
        """Use `flat` (numel + one flag per parameter, or larger) as the gradient buffer."""
        self.flat = flat[:self.numel + len(self.params)]
        self.flags = self.flat[self.numel:]
        self.array = self.flat.numpy() if self.flat.device.type == "cpu" else None

    def shard_grad(self) -> torch.Tensor:
        """Sharding: this rank's part of the reduced gradient."""
        lo, hi = self.part
        return self.kept if self.kept is not None else self.flat[lo:hi]

    def view(self, i: int) -> torch.Tensor:
        p, start = self.params[i], self.offsets[i]
        return self.flat[start:start + p.numel()].view_as(p)

    def is_view(self, i: int, grad) -> bool:
        return (grad is not None and not grad.is_sparse
                and grad.data_ptr() == self.flat[self.offsets[i]:].data_ptr()
                and grad.shape == self.params[i].shape and grad.is_contiguous())


def plan_buckets(sizes_bytes: list[int], bucket_bytes: int,
                 first_bucket_bytes: int = FIRST_BUCKET_BYTES) -> list[list[int]]:
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


def make_buckets(params, bucket_bytes: int, compressor=None, wire_dtype=None,
                 shard: str = "none") -> list[Bucket]:
    """The buckets of `params` (in gradient-ready order) at `bucket_bytes`. `compressor`: the
    reducer's PowerSGD (None: none), whose groups are added here, one per compressed bucket,
    in index order; `wire_dtype`: the 16-bit wire of the uncompressed buckets (not when
    sharded); shard gradients: buckets without buffers of their own. Local; the same on
    every rank (same parameters, same size)."""
    # one dtype, device and kind (PowerSGD-compressed or not) per bucket
    rank = compressor.rank if compressor is not None else 0
    by_kind = {}
    for p in params:
        compress = rank > 0 and powersgd.compressible(p.shape, rank)
        by_kind.setdefault((p.device, p.dtype, compress), []).append(p)
    planned = []
    for (_, _, compress), group in by_kind.items():
        sizes = [p.numel() * p.element_size() for p in group]
        planned += [([group[i] for i in idx], compress) for idx in plan_buckets(sizes, bucket_bytes)]
    # index order = the order their last gradients are expected: buckets of different
    # kinds interleave, so a small bucket of biases does not hold back the matrices
    position = {p: k for k, p in enumerate(params)}
    planned.sort(key=lambda plan: position[plan[0][-1]])
    buckets = []
    for members, compress in planned:
        b = Bucket(len(buckets), members,
                   None if compress or shard != "none" else wire_dtype,
                   lazy=shard == "gradients")
        if compress:
            b.psgd = compressor.add_group([position[p] for p in members],
                                          [p.shape for p in members], extra=len(members),
                                          device=members[0].device,
                                          dtype=members[0].dtype)
        buckets.append(b)
    return buckets
