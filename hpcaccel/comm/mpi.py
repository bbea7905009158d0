"""hpcaccel's own reducer over mpi4py: bucketed, overlapped, zero-copy gradient allreduce.

How a step flows:
  zero_grad()   every .grad set to None (no memset); the buckets are reused. The
                optimizer's own zero_grad() (to None, or zeroing in place) does as well.
  backward()    a post-accumulate hook copies each fresh gradient into its bucket slice,
                makes .grad a view of that slice and marks the parameter ready; when a
                bucket is complete, its in-place allreduce is started (buckets strictly in
                index order, see below). Further backward passes in the same step
                (accumulation) add into the views in place.
  synchronize() starts any bucket not yet started, waits for all, divides by world size
                (op "average"; "sum" leaves the sum), and ends the step: the next backward
                starts a new one, whichever zero_grad() came between.

How a bucket's allreduce runs (`overlap`; the sum itself is the `algorithm`'s, see
algorithms.py, by default MPI_Allreduce in slices):
  thread       (default) a communication thread runs blocking MPI_Allreduce on each bucket
               as it is queued, while backward continues. Blocking Allreduce uses the MPI
               library's tuned algorithms; with Open MPI 4.1 nonblocking MPI_Iallreduce
               (libnbc) was measured 2-3x slower per byte, and it progresses only inside
               MPI calls. mpi4py releases the GIL during MPI calls, so compute and
               communication really run side by side.
  nonblocking  MPI_Iallreduce started from the hook (for MPI libraries with good
               nonblocking collectives or hardware offload).
  none         every bucket's blocking allreduce runs inside synchronize(), no overlap.

Gradient accumulation: backward passes inside no_sync() only accumulate into the buckets;
the first backward outside it communicates as above. Or, as Horovod counts it
(backward_passes_per_step = N): a parameter is ready after its N-th gradient of the step;
the earlier ones accumulate locally.

A parameter without a gradient from this step's backward passes sends what its .grad holds
(Horovod's rule): nothing (zeros, flag 0) when .grad is None, as after zero_grad(); its
current value when the caller kept one (zero_grad(set_to_none=False), no zero_grad at all).

Compression (fp16/bf16): the buckets stay full precision. When its allreduce starts (in the
communication thread with overlap=thread) a bucket is rounded into a 16-bit wire buffer,
which is allreduced with a user-defined MPI sum (MPI has no 16-bit float sum) and widened
back before the division: half the bytes travel. Costs measured in docs/backends.md.

Compression powersgd: matrix-shaped parameters worth it (powersgd.compressible) get buckets
of their own, laid out and started in the same index order as the others; such a bucket
travels as PowerSGD factors (powersgd.py: P with the used flags, then Q, each through the
allreduce algorithm) once the first --powersgd-start-step steps, which go exact, are done.

Sharding (shard optimizer | gradients; sharding.py): a complete bucket is reduce-scattered
instead of allreduced (the ring's first half across hosts, the library's MPI_Reduce_scatter
on one host), so each rank holds the reduced gradient of its part of the bucket only, and
the parameters' .grad are None after synchronize(). step() steps this rank's part of the
optimizer (1/size of its state), then queues each bucket's allgather of the updated values,
the first layer's bucket first, and returns: the next forward starts at once, each module
waiting (forward pre-hook) only for the bucket holding its own parameters. With
`gradients` a bucket's full-size gradient buffer is lent from a small pool while backward
fills it and given back after its reduce-scatter; only this rank's part is kept.

Cross-rank invariants:
  * Buckets are laid out identically on every rank (same parameters, same order) and are
    started in index order on every rank, so nonblocking collectives always match even
    when autograd finishes buckets in a different order on different ranks.
  * Each bucket carries one "used" flag per parameter after the gradients. A parameter
    that has no gradient on this rank (.grad None) contributes zeros and flag 0; after the
    sum, a parameter is updated on every rank iff some rank had a gradient for it, and
    .grad is None on every rank otherwise. No rank waits for a gradient that never comes.
  * The scaling after the sum (op, predivide factor) is the same on every rank, and every
    rank reduces the same buckets per synchronize(), so ranks stay bit-for-bit identical.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time

import torch

from ..collectives import TRACKER
from ..departure import check
from ..optim import clip_grad_norm_
from . import powersgd
from .algorithms import CHUNK_BYTES
from .allreduce_choice import describe as describe_algorithm, make_algorithm
from .algorithms import LibraryShards
from .base import Reducer
from .hierarchical import node_layout
from .sharding import SHARDS, ShardedOptimizer
from .waits import agreement, guarded, wait_bucket, wait_requests

_FIRST_BUCKET_BYTES = 1 << 20
# shard gradients: full-size gradient buffers lent to buckets while backward runs. Two: one
# being filled while the previous one is reduce-scattered.
POOL_BUFFERS = 2  # small first bucket: communication starts early in backward
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
WIRE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_wire_sums = {}  # torch dtype -> MPI.Op, created once per process
REDUCE_OPS = ("average", "sum")


class TooManyBackwardPasses(RuntimeError, AssertionError):
    """A parameter got more gradients in one step than the reducer expects (more backward
    passes than backward_passes_per_step, outside no_sync()). A RuntimeError, and the
    AssertionError Horovod's DistributedOptimizer raises in this case."""


def wire_sum_op(dtype: torch.dtype):
    """The MPI sum of 16-bit floats of `dtype`, carried as MPI 16-bit integers.

    MPI calls it on chunks of the message; torch adds them in place (one rounding per
    addition, as any 16-bit float sum does). torch, not numpy: numpy's float16 add is about
    50 times slower (53 ms vs 1.0 ms for 6.5 M elements, measured) and has no bfloat16.
    """
    if dtype not in _wire_sums:
        from mpi4py import MPI

        def add(inbuf, inoutbuf, datatype):
            if len(inbuf):
                torch.frombuffer(inoutbuf, dtype=dtype).add_(torch.frombuffer(inbuf, dtype=dtype))
        _wire_sums[dtype] = MPI.Op.Create(add, commute=True)
    return _wire_sums[dtype]


class _Bucket:
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
        # MPI sees its bits as int16 (wire_sum_op).
        if wire_dtype is None and not on_host:
            wire_dtype = self.flat.dtype
        self.wire = None if wire_dtype is None else torch.zeros(
            len(self.flat), dtype=wire_dtype, pin_memory=not on_host)
        self.wire_16bit = self.wire is not None and self.wire.element_size() == 2
        self.wire_array = None if self.wire is None else (
            self.wire.view(torch.int16) if self.wire_16bit else self.wire).numpy()
        self.pending = len(params)
        self.ready = [False] * len(params)
        self.touched = [False] * len(params)  # got a gradient on this rank this step
        self.passes = [0] * len(params)       # gradients counted toward ready this step
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

    OVERLAP = ("thread", "nonblocking", "none")

    def __init__(self, comm=None, bucket_bytes: int | None = None, overlap: str = "thread",
                 compression: str = "none", chunk_bytes: int = CHUNK_BYTES, algorithm=None,
                 timeline=None, powersgd_rank: int = 4, powersgd_start_step: int = 0,
                 op: str = "average", predivide_factor: float = 1.0,
                 backward_passes_per_step: int = 1, shard: str = "none"):
        """bucket_bytes: the bucket size; None: chosen from the link at attach()
        (bucket_size.py, --bucket-mb auto). compression: none, fp16/bf16 on the wire (gradients rounded to 16 bits), or
        powersgd (rank-`powersgd_rank` factors after `powersgd_start_step` exact steps).
        algorithm: sums one flat buffer in place over `comm`: an object (algorithms.py) or
        a --allreduce name (allreduce_choice.py; None = auto: the library's allreduce in slices of
        chunk_bytes on one host, ring or hierarchical across hosts; collective).
        timeline: records each bucket's allreduce. op: "average" (the mean over ranks) or
        "sum". predivide_factor (average only): gradients are scaled by 1/f before the sum
        and by f/size after it, as Horovod's gradient_predivide_factor; 1.0 divides the sum
        by the size. backward_passes_per_step: gradients a parameter gets per step before its
        allreduce may start (set_backward_passes_per_step). shard: none, optimizer (each rank
        steps its part of the optimizer state, ZeRO stage 1) or gradients (and keeps only its
        part of the reduced gradient, stage 2); see the module docstring."""
        from mpi4py import MPI

        if overlap not in self.OVERLAP:
            raise ValueError(f"overlap must be one of {self.OVERLAP}, got {overlap!r}")
        if compression not in ("none", "powersgd") and compression not in WIRE_DTYPES:
            raise ValueError(f"compression must be none, fp16, bf16 or powersgd, got {compression!r}")
        if compression == "powersgd" and overlap == "nonblocking":
            raise ValueError("powersgd needs two allreduces with compute between: "
                             "overlap thread or none")
        if shard not in SHARDS:
            raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
        if shard != "none" and compression == "powersgd":
            raise ValueError("--shard: PowerSGD sends low-rank factors of whole matrices, "
                             "which cannot be reduce-scattered; use --shard none with it")
        if shard != "none" and overlap == "nonblocking":
            raise ValueError("shard needs overlap thread or none")
        self.shard = shard
        if op not in REDUCE_OPS:
            raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")
        if float(predivide_factor) != 1.0 and op != "average":
            raise ValueError("predivide_factor applies to op average only")
        if not float(predivide_factor) > 0:
            raise ValueError(f"predivide_factor must be positive, got {predivide_factor}")
        self.op = op
        self.predivide_factor = float(predivide_factor)
        self.backward_passes_per_step = self._passes(backward_passes_per_step)
        # what the error of a surplus gradient tells the caller to do
        self.too_many_passes_hint = "wrap all but the last backward in reducer.no_sync()"
        self.wire_dtype = WIRE_DTYPES.get(compression)
        self._wire_op = None if self.wire_dtype is None else wire_sum_op(self.wire_dtype)
        self._MPI = MPI
        self.overlap = overlap
        # The gradients get a communicator of their own: a rank that skips or adds a control
        # collective (a bug in user code or ours) then hangs, caught by the watchdog and
        # named by the hang report, instead of its vote matching a peer's bucket allreduce
        # and mixing gradients with control values.
        super().__init__((comm or MPI.COMM_WORLD).Dup(), timeline)
        self.bucket_auto = bucket_bytes is None  # the size comes from the link (attach)
        self.bucket_bytes = None if bucket_bytes is None else int(bucket_bytes)
        # --bucket-mb auto: (latency s, bandwidth B/s) measured across hosts, None on one
        # host, "checkpoint" when a resumed run took its checkpoint's size
        self.link = None
        if algorithm is None or isinstance(algorithm, str):
            try:
                algorithm = make_algorithm(self.comm, algorithm or "auto", chunk_bytes)
            except BaseException:
                self.comm.Free()  # collective, like the Dup: make_algorithm fails on every rank
                raise
        self.algorithm = algorithm
        self._powersgd_args = (self.size, powersgd_rank, powersgd_start_step)
        self.powersgd = (powersgd.PowerSGD(*self._powersgd_args)
                         if compression == "powersgd" else None)
        self.buckets: list[_Bucket] = []
        self._params: list[torch.nn.Parameter] = []  # attached, in bucket order
        self._where = {}          # parameter -> (bucket, index in bucket)
        self._next_launch = 0     # buckets [0, _next_launch) have been started this step
        self._any_grad = False    # a gradient arrived since the step began (pending)
        self._sync = True
        self._handles = []
        self._queue = None  # overlap=thread: buckets waiting for the communication thread
        self._worker = None
        self._worker_error = None
        self.sharded = None    # ShardedOptimizer, once attached with shard != none
        self._pool = []        # shard gradients: free gradient buffers lent to buckets
        self._pool_lock = threading.Condition()
        self._lent = []        # buckets holding a lent buffer
        # hpcaccel.torch: agrees on each step's exchange across ranks in its engine (raises
        # where ranks are elsewhere; waits.py)
        self.exchange = None
        self._broken = False   # a wait failed: a bucket's allreduce may never complete

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
        """model: a Module, or the parameters themselves (an iterable, in the order a
        module would register them; repeats are taken once). Collective. Gradients a
        parameter already has count as gradients of the first step."""
        self.optimizer = optimizer
        if isinstance(model, torch.nn.Module):
            registered = list(model.parameters())
        else:
            registered = list({id(p): p for p in model}.values())  # first occurrence kept
        # Reverse registration order approximates the order autograd produces gradients.
        params = [p for p in reversed(registered) if p.requires_grad]
        for p in params:
            if p.dtype not in (torch.float32, torch.float64):
                raise NotImplementedError(f"the mpi reducer handles float32/float64 "
                                          f"parameters, not {p.dtype}")
        self._params = params
        if self.size == 1:
            # Nothing to average: no buckets, no hooks, no copies. Gradients stay autograd's
            # own tensors and a parameter without one keeps .grad None, as the contract says.
            return
        if self.bucket_bytes is None:  # collective: every rank measures, all get one size
            from . import bucket_size
            local, hosts, _ = node_layout(self.comm)
            local.Free()
            if hosts > 1:
                self.link = bucket_size.fit_link(bucket_size.probe(self.algorithm, self.comm))
                grad_bytes = sum(p.numel() * p.element_size() for p in params)
                self.bucket_bytes = bucket_size.choose(grad_bytes, *self.link)
            else:
                self.bucket_bytes = bucket_size.ONE_HOST_BYTES
        self._plan(params)
        for b in self.buckets:
            for p in b.params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if self.shard != "none":
            self._shard_setup(model if isinstance(model, torch.nn.Module) else None, optimizer)
        self._reset_step()

    def _shard_setup(self, module, optimizer, hooks: bool = True):
        """Each bucket's parameters moved into one flat buffer of values (their .data views of
        it), this rank's part of the optimizer built, and forward pre-hooks on `module`'s
        submodules (without a module, step() waits for every allgather itself)."""
        from .ring import chunk_bounds
        for b in self.buckets:
            if b.params[0].device.type != "cpu":
                raise ValueError("--shard: parameters on CPU only (GPU buffers would need a "
                                 "CUDA-aware MPI or host staging, not built)")
            b.values = torch.empty(b.numel, dtype=b.params[0].dtype)
            for i, p in enumerate(b.params):
                view = b.values[b.offsets[i]:b.offsets[i] + p.numel()].view_as(p)
                view.copy_(p.detach())
                p.data = view
            b.part = chunk_bounds(b.numel, self.size)[self.rank]
        self.sharded = ShardedOptimizer(optimizer, self.buckets, self.comm)
        self._shard_ops = (self.algorithm if hasattr(self.algorithm, "reduce_scatter_")
                           else LibraryShards(self.comm))
        if not hooks:
            return
        self._forward_waits = module is not None
        if module is not None:
            for m in module.modules():
                own = [p for p in m.parameters(recurse=False) if p in self._where]
                if own:  # buckets looked up per call: a resumed run may re-plan them
                    self._handles.append(m.register_forward_pre_hook(
                        lambda _m, _inputs, own=own: self._await_values(
                            {id(b): b for b in (self._where[p][0] for p in own)}.values())))

    def _plan(self, params):
        """(Re)build the buckets of `params` at self.bucket_bytes. Local; the same on every
        rank (same parameters, same size)."""
        self.buckets, self._where = [], {}
        if self.powersgd is not None:  # its groups follow the buckets
            self.powersgd = powersgd.PowerSGD(*self._powersgd_args)
        # one dtype, device and kind (PowerSGD-compressed or not) per bucket
        rank = self.powersgd.rank if self.powersgd is not None else 0
        by_kind = {}
        for p in params:
            compress = rank > 0 and powersgd.compressible(p.shape, rank)
            by_kind.setdefault((p.device, p.dtype, compress), []).append(p)
        planned = []
        for (_, _, compress), group in by_kind.items():
            sizes = [p.numel() * p.element_size() for p in group]
            planned += [([group[i] for i in idx], compress) for idx in plan_buckets(sizes, self.bucket_bytes)]
        # index order = the order their last gradients are expected: buckets of different
        # kinds interleave, so a small bucket of biases does not hold back the matrices
        position = {p: k for k, p in enumerate(params)}
        planned.sort(key=lambda plan: position[plan[0][-1]])
        for members, compress in planned:
            b = _Bucket(len(self.buckets), members,
                        None if compress or self.shard != "none" else self.wire_dtype,
                        lazy=self.shard == "gradients")
            if compress:
                b.psgd = self.powersgd.add_group([position[p] for p in members],
                                                 [p.shape for p in members], extra=len(members),
                                                 device=members[0].device,
                                                 dtype=members[0].dtype)
            self.buckets.append(b)
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self._where[p] = (b, i)

    # -- per step -------------------------------------------------------------------------
    def zero_grad(self):
        if self.size == 1:
            for p in self._params:
                p.grad = None
            return
        if any(b.request is not None for b in self.buckets):
            raise RuntimeError("zero_grad() while gradients are being reduced: "
                               "call synchronize() first")
        self._reset_step()
        # No memset of the buckets: autograd hands each parameter a fresh gradient and
        # _on_grad copies it in (one pass), instead of zeroing the bucket and having
        # autograd add into it (three). Slices of parameters without one are zeroed at launch.
        for p in self._params:
            p.grad = None

    def _reset_step(self):
        """Local. Forget this step's bookkeeping (no bucket in flight): nothing started,
        nothing ready, no gradient counted. Gradients themselves are left as they are."""
        for b in self.buckets:
            b.pending = len(b.params)
            b.ready = [False] * len(b.params)
            b.touched = [False] * len(b.params)
            b.passes = [0] * len(b.params)
        self._next_launch = 0
        self._any_grad = False

    @property
    def pending(self) -> bool:
        """Local. Gradients arrived since the step began (the last synchronize() or
        zero_grad()) that no synchronize() has reduced yet."""
        return self._any_grad

    @staticmethod
    def _passes(n) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"backward_passes_per_step must be an integer > 0, got {n!r}")
        return n

    def set_backward_passes_per_step(self, n: int) -> None:
        """Local. From now on a parameter is ready after its n-th gradient of a step; the
        count of every parameter not yet ready starts again (Horovod's rule). The same n on
        every rank, or buckets would start in different steps."""
        self.backward_passes_per_step = self._passes(n)
        for b in self.buckets:
            b.passes = [n if ready else 0 for ready in b.ready]

    def _on_grad(self, p):
        b, i = self._where[p]
        if b.flat is None:
            self._lend(b)
        if not b.is_view(i, p.grad):
            # A fresh gradient (after zero_grad): move it into the bucket (one copy). Later
            # backward passes of the step (accumulation) add into the bucket in place.
            # Sparse gradients (embeddings) become dense here: buckets are dense.
            b.view(i).copy_(p.grad.to_dense() if p.grad.is_sparse else p.grad)
            p.grad = b.view(i)
        b.touched[i] = True
        self._any_grad = True
        if not self._sync:
            return  # accumulating locally; communication happens on the last micro-step
        if b.ready[i]:
            n = self.backward_passes_per_step
            got = "a gradient twice" if n == 1 else f"more than {n} gradients"
            raise TooManyBackwardPasses(f"a parameter received {got} in one step; "
                                        f"{self.too_many_passes_hint}")
        b.passes[i] += 1
        if b.passes[i] < self.backward_passes_per_step:
            return  # accumulating locally until this parameter's last pass of the step
        b.ready[i] = True
        b.pending -= 1
        if b.pending == 0:
            self._launch_ready()

    def _on_wire(self, b: _Bucket):
        """(buffer, op) that MPI reduces for bucket b: the bucket, or its 16-bit copy, which
        this rounds from the bucket now (in whichever thread runs the allreduce). A
        predivide factor f scales the gradients by 1/f first."""
        if self.predivide_factor != 1.0:
            b.flat[:b.numel].mul_(1.0 / self.predivide_factor)
        if b.wire is None:
            return b.array, self._MPI.SUM
        b.wire.copy_(b.flat)
        if not b.wire_16bit:
            return b.wire_array, self._MPI.SUM  # host copy of a GPU bucket
        return [b.wire_array, self._MPI.INT16_T], self._wire_op

    def _average(self, b: _Bucket):
        """After the sum: back from the wire buffer (if any) into the bucket, then divide the
        gradients (not the flags, which stay counts) by the world size (op average; times
        f/size with a predivide factor f; op sum: left as they are). Buckets exist only on
        communicators of more than one rank."""
        if b.wire is not None:
            b.flat.copy_(b.wire)
        if self.op == "sum":
            return
        if self.predivide_factor == 1.0:
            b.flat[:b.numel].div_(self.size)
        else:
            b.flat[:b.numel].mul_(self.predivide_factor / self.size)

    def _launch(self, b: _Bucket):
        """Start bucket b's allreduce. Training thread, in bucket order."""
        self._next_launch = b.index + 1
        if b.flat is None:
            self._lend(b)
        TRACKER.enter("bucket allreduce", b.flat.numel() * b.flat.element_size(), "gradients")
        b.seq = TRACKER.seq["gradients"]  # this bucket's collective number (waits.py)
        # Parameters without a gradient this step send what .grad holds: None -> zeros and
        # an unset flag; a gradient kept from before (not zeroed by the caller) -> its value.
        used = list(b.touched)
        for i, touched in enumerate(b.touched):
            if not touched:
                grad = b.params[i].grad
                if grad is None:
                    b.view(i).zero_()
                    continue
                used[i] = True
                if not b.is_view(i, grad):
                    b.view(i).copy_(grad.to_dense() if grad.is_sparse else grad)
                    b.params[i].grad = b.view(i)
        b.flags.copy_(torch.tensor(used, dtype=b.flags.dtype))
        if self.shard != "none":
            if self.overlap == "thread":
                b.request = True
                b.done.clear()
                if self._worker is None:
                    self._start_worker()
                self._queue.put(("reduce_scatter", b))
            return  # overlap none: reduce-scattered in synchronize()
        if self.overlap == "nonblocking":
            buf, op = self._on_wire(b)
            b.request = self.comm.Iallreduce(self._MPI.IN_PLACE, buf, op=op)
        elif self.overlap == "thread":
            b.request = True  # in flight
            b.done.clear()
            if self._worker is None:
                self._start_worker()
            self._queue.put(b)
        # overlap == "none": reduced in synchronize()

    def _allreduce_mean(self, b: _Bucket):
        """Blocking sum, then the mean, in this bucket's memory (the flags stay sums)."""
        t0 = time.perf_counter()
        if b.psgd is not None and self.powersgd.active:
            self._powersgd_mean(b)
            if self.op == "sum":  # PowerSGD approximates the mean; the sum is size times it
                b.flat[:b.numel].mul_(self.size)
            nbytes = self.powersgd.wire_numel(b.psgd) * b.flat.element_size()
        else:
            buf, op = self._on_wire(b)
            self.algorithm.allreduce_(buf, op)
            self._average(b)
            nbytes = b.flat.numel() * b.flat.element_size()
        self.timeline.add("bucket_allreduce", t0, time.perf_counter(), bucket=b.index,
                          bytes=nbytes)

    def _powersgd_mean(self, b: _Bucket):
        """The bucket's gradients replaced by the PowerSGD approximation of their mean; the
        used flags ride with P, so a parameter no rank touched keeps its error feedback."""
        views = [b.view(i) for i in range(len(b.params))]
        used = self.powersgd.average_(b.psgd, views, lambda t: self.allreduce_(t), extra=b.flags,
                                      skip=lambda used: (used == 0).tolist())
        b.flags.copy_(used)

    def _start_worker(self):
        self._queue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._communicate, name="hpcaccel-allreduce",
                                        daemon=True)
        self._worker.start()

    def _communicate(self):
        """Communication thread: allreduce buckets in the order queued (= index order, the
        same on every rank). The only thread calling MPI while a step's buckets are in
        flight; the training thread calls MPI again only after synchronize()."""
        while True:
            b = self._queue.get()
            if b is None:
                return
            kind, b = b if isinstance(b, tuple) else ("allreduce", b)
            try:
                if self._worker_error is None:
                    {"allreduce": self._allreduce_mean, "reduce_scatter": self._reduce_scatter_mean,
                     "allgather": self._allgather_values}[kind](b)
            except BaseException as e:  # re-raised in the training thread by synchronize()
                self._worker_error = e
            finally:
                (b.gathered if kind == "allgather" else b.done).set()

    def _launch_ready(self):
        # Strictly in index order: a complete bucket waits for earlier ones (invariant 1).
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            self._launch(self.buckets[self._next_launch])
        if self.overlap == "nonblocking":
            # Nonblocking collectives progress only inside MPI calls: give them a nudge.
            active = [b.request for b in self.buckets[:self._next_launch] if b.request is not None]
            if active:
                self._MPI.Request.Testall(active)

    def _finish_buckets(self, reduce, what: str) -> None:
        """Every launched bucket's reduction done: waited for (overlap thread; failing where a
        peer left or is elsewhere, waits.py), or run here (overlap none); agreed."""
        agree = agreement(self)
        if agree is not None and self.overlap != "thread":
            agree()  # first: a rank elsewhere would hang the blocking reductions below
        if self.overlap == "thread":
            for b in self.buckets:
                guarded(self, wait_bucket, b, agree)
            if self._worker_error is not None:
                raise RuntimeError(f"gradient {what} failed") from self._worker_error
        else:
            for b in self.buckets:
                reduce(b)
        if agree is not None:
            agree.later()

    def synchronize(self):
        if self.sharded is not None:
            self._synchronize_shards()
            return
        for b in self.buckets[self._next_launch:]:
            self._launch(b)  # incomplete buckets: missing gradients are zeros, flags 0
        if self.overlap == "nonblocking":
            agree = agreement(self)
            guarded(self, wait_requests, self.buckets, agree)
            if agree is not None:
                agree.later()
        else:
            self._finish_buckets(self._allreduce_mean, "allreduce")
        for b in self.buckets:
            if self.overlap == "nonblocking":
                self._average(b)
            b.request = None
            used = b.flags.tolist()  # one read per bucket, not one tensor op per parameter
            for i, p in enumerate(b.params):
                if used[i] > 0:
                    if not b.is_view(i, p.grad):
                        p.grad = b.view(i)
                else:
                    p.grad = None  # no rank produced a gradient: skip it everywhere
        # The step ends here, on every rank alike: the next backward starts a new one, so a
        # loop that clears gradients with optimizer.zero_grad() (or not at all) works too.
        self._reset_step()
        TRACKER.leave("gradients")
        if self.powersgd is not None:
            self.powersgd.end_step()

    # -- sharding ---------------------------------------------------------------------------
    def _lend(self, b: _Bucket) -> None:
        """shard gradients: give bucket b a gradient buffer: the smallest free one it fits
        in, else a new one of its own size. At most POOL_BUFFERS exist while buckets are in
        flight: backward then waits for a reduce-scatter to give one back, which bounds the
        gradient memory whatever the link's speed. A new one is made instead when none of
        the holders is in flight (they wait for gradients still to come: waiting could
        deadlock), e.g. during accumulation. synchronize() frees them all: between steps a
        rank holds only its parts."""
        need = b.numel + len(b.params)
        with self._pool_lock:
            while (len(self._pool) + len(self._lent) >= POOL_BUFFERS
                   and not any(t.numel() >= need for t in self._pool)
                   and any(x.request is not None for x in self._lent)
                   and self._worker_error is None):
                self._pool_lock.wait(timeout=1.0)
                for x in self._lent:  # one in flight whose peer left would never give it back
                    if x.request is not None:
                        check("gradients", x.seq, f"bucket reduce-scatter {x.index}")
            fits = sorted((t for t in self._pool if t.numel() >= need), key=torch.Tensor.numel)
            buf = fits[0] if fits else None
            if buf is not None:  # by identity: == on tensors compares elements
                self._pool = [t for t in self._pool if t is not buf]
            elif self._pool and len(self._pool) + len(self._lent) >= POOL_BUFFERS:
                self._pool.pop()  # too small: make room for one that fits
            self._lent.append(b)
        if buf is None:
            buf = torch.empty(need, dtype=b.params[0].dtype)
        b.bind(buf)

    def _give_back(self, b: _Bucket) -> None:
        """shard gradients, communication thread: keep this rank's part of the reduced
        gradient, drop the parameters' views and return the buffer to the pool. The
        training thread no longer touches this bucket's gradients in this step (they were
        all ready before its launch)."""
        lo, hi = b.part
        if b.kept is None:
            b.kept = torch.empty(hi - lo, dtype=b.flat.dtype)
        b.kept.copy_(b.flat[lo:hi])
        for p in b.params:
            p.grad = None
        buf = b.flat._base if b.flat._base is not None else b.flat
        b.flat = b.flags = b.array = None
        with self._pool_lock:
            self._lent.remove(b)
            if len(self._pool) + len(self._lent) < POOL_BUFFERS:
                self._pool.append(buf)  # else dropped: back to POOL_BUFFERS once idle
            self._pool_lock.notify_all()

    def _reduce_scatter_mean(self, b: _Bucket):
        """Sum this rank's part of the bucket over ranks and take its mean (the used flags
        of all buckets are summed in synchronize). With compression the gradients travel as
        16-bit copies."""
        t0 = time.perf_counter()
        if self.predivide_factor != 1.0:
            b.flat[:b.numel].mul_(1.0 / self.predivide_factor)
        lo, hi = b.part
        grads = b.flat[:b.numel]
        if self.wire_dtype is None:
            self._shard_ops.reduce_scatter_(grads.numpy(), self._MPI.SUM)
        else:
            wire = grads.to(self.wire_dtype)
            self._shard_ops.reduce_scatter_([wire.view(torch.int16).numpy(), self._MPI.INT16_T],
                                            self._wire_op)
            grads[lo:hi].copy_(wire[lo:hi])
        b.local_flags = b.flags.clone()  # summed for all buckets at once in synchronize()
        if self.op == "average" and self.predivide_factor != 1.0:
            grads[lo:hi].mul_(self.predivide_factor / self.size)
        elif self.op == "average":
            grads[lo:hi].div_(self.size)
        if self.shard == "gradients":
            self._give_back(b)
        self.timeline.add("bucket_reduce_scatter", t0, time.perf_counter(), bucket=b.index,
                          bytes=b.numel * (grads.element_size() if self.wire_dtype is None else 2))

    def _allgather_values(self, b: _Bucket):
        t0 = time.perf_counter()
        self._shard_ops.allgather_(b.values.numpy())
        self.timeline.add("bucket_allgather", t0, time.perf_counter(), bucket=b.index,
                          bytes=b.numel * b.values.element_size())

    def _await_values(self, buckets) -> None:
        """Forward pre-hook: wait until these buckets' updated values have arrived."""
        for b in buckets:
            if not b.gathered.is_set():
                b.gathered.wait()
                if self._worker_error is not None:
                    raise RuntimeError("parameter allgather failed") from self._worker_error

    def wait_parameters(self) -> None:
        """Every parameter's value complete on this rank (no allgather in flight)."""
        if self.sharded is not None:
            self._await_values(self.buckets)

    def _synchronize_shards(self):
        self.wait_parameters()
        for b in self.buckets[self._next_launch:]:
            self._launch(b)
        self._finish_buckets(self._reduce_scatter_mean, "reduce-scatter")
        # every bucket's used flags in one small allreduce (not one per bucket: across hosts
        # each costs a round trip)
        flags = torch.cat([b.local_flags for b in self.buckets])
        self.comm.Allreduce(self._MPI.IN_PLACE, flags.numpy(), op=self._MPI.SUM)
        used, start = flags.tolist(), 0
        for b in self.buckets:
            b.used = [f > 0 for f in used[start:start + len(b.params)]]
            start += len(b.params)
            b.request = None
            for p in b.params:
                p.grad = None  # only this rank's part is reduced: the optimizer's pieces hold it
        self.sharded.set_grads()
        with self._pool_lock:
            self._pool.clear()  # temporary buffers: none held between steps
        self._reset_step()
        TRACKER.leave("gradients")

    def clip_grad_norm_(self, max_norm: float, params=None) -> torch.Tensor:
        """Collective. Sharded: the clipping of torch.nn.utils.clip_grad_norm_ over the whole
        gradient (its norm summed across ranks); unsharded: that function itself."""
        if self.sharded is None:
            return clip_grad_norm_([p.grad for p in (self._params if params is None else params)],
                                   max_norm)
        return self.sharded.clip_grad_norm_(max_norm, params)

    def step(self) -> None:
        """Sharded: step this rank's part of the optimizer bucket by bucket, the first
        layer's first, each bucket's allgather starting once its part is stepped (the link
        does not wait for the whole step); returns before they end unless no forward
        pre-hooks wait for them (a parameter list was attached, or overlap none)."""
        def gather(b):
            b.gathered.clear()
            if self.overlap == "thread":
                if self._worker is None:
                    self._start_worker()
                self._queue.put(("allgather", b))
            else:
                self._allgather_values(b)
                b.gathered.set()
        self.sharded.step(stepped=gather)  # the first layer's bucket first
        if not self._forward_waits:
            self.wait_parameters()

    @contextlib.contextmanager
    def full_optimizer_state(self):
        """Collective. Sharded: within it the optimizer holds the whole state on rank 0 (a
        checkpoint's); the parameters are complete."""
        self.wait_parameters()
        if self.sharded is None:
            yield
            return
        with self.sharded.gathered_state(root=0):
            yield

    def optimizer_state_loaded(self) -> None:
        """Local. Sharded: the optimizer was given a whole state (from a checkpoint): keep
        this rank's part of it."""
        if self.sharded is not None:
            self.sharded.scatter_state()

    def state_dict(self) -> dict:
        state = {"bucket_bytes": self.bucket_bytes}
        if self.powersgd is not None:
            state["powersgd"] = self.powersgd.state_dict()
        return state

    def load_state_dict(self, state: dict, exact: bool = True) -> None:
        # An automatic size is the checkpoint's, so a resumed run adds in the same order
        # (bucket_size.py); every rank loads the same value (ranks' states share it). Not
        # from another world size (exact False): the order changes anyway, and the size
        # was chosen for another layout.
        saved = state.get("bucket_bytes")
        if self.bucket_auto and exact and saved and saved != self.bucket_bytes and self.buckets:
            self.bucket_bytes, self.link = int(saved), "checkpoint"
            self.wait_parameters()
            self._plan(self._params)
            if self.sharded is not None:  # the same state, in the new buckets' pieces
                self._shard_setup(None, self.sharded.user, hooks=False)
            self.zero_grad()
        if self.powersgd is not None and "powersgd" in state:
            self.powersgd.load_state_dict(state["powersgd"], errors=exact)

    @contextlib.contextmanager
    def no_sync(self):
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    # -- tensors --------------------------------------------------------------------------
    def allreduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` over ranks in place (op: sum, max, min) and return it. A contiguous
        CPU tensor is handed to MPI as is (zero copy); others go through a host copy."""
        mpi_op = getattr(self._MPI, _OPS[op])
        if tensor.is_contiguous() and tensor.device.type == "cpu":
            self.algorithm.allreduce_(tensor.detach().numpy().reshape(-1), mpi_op)
            return tensor
        host = tensor.detach().cpu().contiguous()
        self.algorithm.allreduce_(host.numpy().reshape(-1), mpi_op)
        with torch.no_grad():
            tensor.copy_(host)
        return tensor

    def describe(self) -> str:
        what = f"allreduce: {describe_algorithm(self.algorithm)}"
        if self.sharded is not None:
            halves = (self.algorithm.describe() if hasattr(self.algorithm, "reduce_scatter_")
                      else "the MPI library's")
            what = f"reduce-scatter and allgather: {halves}"
        if self.bucket_auto and self.bucket_bytes is not None:
            from .bucket_size import describe as describe_buckets
            what += f", {describe_buckets(self.bucket_bytes, self.link)}"
        elif self.bucket_bytes is not None and self.size > 1:
            from ..wording import mib
            what += f", buckets {mib(self.bucket_bytes)}"
        if self.sharded is not None:
            what += (", optimizer state" if self.shard == "optimizer" else
                     ", optimizer state and gradients") + f" sharded across {self.size} ranks"
        return f"{self.name} ({what})"

    def close(self):
        if self._worker is not None and self.sharded is not None and not self._broken:
            self.wait_parameters()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._worker is not None and not self._broken:  # broken: it may wait forever
            self._queue.put(None)
            self._worker.join()
        self._worker = None
        getattr(self.algorithm, "close", lambda: None)()
        if self.comm is not None:
            self.comm.Free()
            self.comm = None
