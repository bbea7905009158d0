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

Gradient accumulation: backward passes inside no_sync() only accumulate into the buckets;
the first backward outside it communicates as above. Or, as Horovod counts it
(backward_passes_per_step = N): a parameter is ready after its N-th gradient of the step;
the earlier ones accumulate locally.

A parameter without a gradient from this step's backward passes sends what its .grad holds
(Horovod's rule): nothing (zeros, flag 0) when .grad is None, as after zero_grad(); its
current value when the caller kept one (zero_grad(set_to_none=False), no zero_grad at all).

The reducer's parts, each in its module:
  buckets.py       the bucket (gradients, then the used flags) and the plan of buckets
  overlap.py       the hook, each bucket's reduction started in index order, the
                   communication thread (overlap thread | nonblocking | none), the waiting
  wire.py          what travels: full precision, fp16/bf16, PowerSGD factors; the mean
  sharded_step.py  shard optimizer | gradients: reduce-scatter, lent gradient buffers,
                   the per-bucket optimizer step and allgather

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
import threading

import torch

from ..collectives import TRACKER
from . import powersgd
from .algorithms import CHUNK_BYTES
from .allreduce_choice import describe as describe_algorithm, make_algorithm
from .base import Reducer
from .buckets import Bucket, make_buckets
from .overlap import Overlap, TooManyBackwardPasses  # noqa: F401 - raised to the user
from .sharded_step import ShardedStep
from .sharding import SHARDS
from .wire import WIRE_DTYPES, wire_sum_op

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
REDUCE_OPS = ("average", "sum")


class MPIReducer(Overlap, ShardedStep, Reducer):
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
        part of the reduced gradient, stage 2); see sharded_step.py."""
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
        self.buckets: list[Bucket] = []
        self._params: list[torch.nn.Parameter] = []  # attached, in bucket order
        self._where = {}          # parameter -> (bucket, index in bucket)
        self._next_launch = 0     # buckets [0, _next_launch) have been started this step
        self._any_grad = False    # a gradient arrived since the step began (pending)
        self._sync = True
        self._handles = []
        self._queue = None  # overlap=thread: (kind, bucket) waiting for the communication thread
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
            from .bucket_size import for_link
            self.bucket_bytes, self.link = for_link(
                self.algorithm, self.comm, sum(p.numel() * p.element_size() for p in params))
        self._plan(params)
        for b in self.buckets:
            for p in b.params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if self.shard != "none":
            self._shard_setup(model if isinstance(model, torch.nn.Module) else None, optimizer)
        self._reset_step()

    def _plan(self, params):
        """(Re)build the buckets of `params` at self.bucket_bytes. Local; the same on every
        rank (same parameters, same size)."""
        if self.powersgd is not None:  # its groups follow the buckets
            self.powersgd = powersgd.PowerSGD(*self._powersgd_args)
        self.buckets = make_buckets(params, self.bucket_bytes, self.powersgd, self.wire_dtype,
                                    self.shard)
        # parameter -> (bucket, index in bucket)
        self._where = {p: (b, i) for b in self.buckets for i, p in enumerate(b.params)}

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
            b.new_step()
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

    def synchronize(self):
        if self.sharded is not None:
            self._synchronize_shards()  # sharded_step.py
        else:
            self._synchronize_buckets()  # overlap.py
        # The step ends here, on every rank alike: the next backward starts a new one, so a
        # loop that clears gradients with optimizer.zero_grad() (or not at all) works too.
        self._reset_step()
        TRACKER.leave("gradients")
        if self.powersgd is not None:
            self.powersgd.end_step()

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
