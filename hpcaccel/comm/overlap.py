"""How the mpi reducer overlaps communication with backward: the post-accumulate hook, each
bucket's reduction started in index order, and the waiting for it in synchronize().

The hook (`_on_grad`) copies a fresh gradient into its bucket slice, makes .grad a view of
it and counts the parameter's passes; once a parameter has its last gradient of the step
(outside no_sync(): the backward_passes_per_step-th) it is ready, and a bucket whose
parameters are all ready is started.

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
Sharded, a bucket is reduce-scattered instead, and the updated values allgathered after
step() (sharded_step.py), through the same thread (overlap thread) or inline (none).

Cross-rank invariant: buckets are started strictly in index order on every rank (a
complete bucket waits for earlier ones), so collectives always match even when autograd
finishes buckets in a different order on different ranks. The communication thread runs
them in the order queued, which is that order.
"""
from __future__ import annotations

import queue
import threading
import time

import torch

from ..collectives import TRACKER
from . import wire
from .waits import agreement, guarded, wait_bucket, wait_requests


class TooManyBackwardPasses(RuntimeError, AssertionError):
    """A parameter got more gradients in one step than the reducer expects (more backward
    passes than backward_passes_per_step, outside no_sync()). A RuntimeError, and the
    AssertionError Horovod's DistributedOptimizer raises in this case."""


class Overlap:
    """MPIReducer's hook and launching (mpi.py): gradients counted into their buckets, a
    complete bucket's reduction started in index order (by the hook, or by synchronize() for
    incomplete ones), run by the communication thread, a nonblocking request or
    synchronize() itself, and waited for. State (set up by the reducer): the buckets'
    bookkeeping, _any_grad, _sync, _next_launch, and the thread's _queue, _worker and
    _worker_error."""

    def _on_grad(self, p):
        """Post-accumulate hook of parameter p (registered by attach())."""
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

    def _launch(self, b):
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
                self._queue_work("reduce_scatter", b)
            return  # overlap none: reduce-scattered in synchronize()
        if self.overlap == "nonblocking":
            buf, op = wire.on_wire(b, self.predivide_factor, self._wire_op)
            b.request = self.comm.Iallreduce(self._MPI.IN_PLACE, buf, op=op)
        elif self.overlap == "thread":
            b.request = True  # in flight
            b.done.clear()
            self._queue_work("allreduce", b)
        # overlap == "none": reduced in synchronize()

    def _launch_ready(self):
        # Strictly in index order: a complete bucket waits for earlier ones (the invariant).
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            self._launch(self.buckets[self._next_launch])
        if self.overlap == "nonblocking":
            # Nonblocking collectives progress only inside MPI calls: give them a nudge.
            active = [b.request for b in self.buckets[:self._next_launch] if b.request is not None]
            if active:
                self._MPI.Request.Testall(active)

    def _allreduce_mean(self, b):
        """Blocking sum, then the mean, in this bucket's memory (the flags stay sums)."""
        t0 = time.perf_counter()
        if b.psgd is not None and self.powersgd.active:
            wire.powersgd_mean(b, self.powersgd, self.allreduce_)
            if self.op == "sum":  # PowerSGD approximates the mean; the sum is size times it
                b.flat[:b.numel].mul_(self.size)
            nbytes = self.powersgd.wire_numel(b.psgd) * b.flat.element_size()
        else:
            buf, op = wire.on_wire(b, self.predivide_factor, self._wire_op)
            self.algorithm.allreduce_(buf, op)
            wire.average(b, self.op, self.predivide_factor, self.size)
            nbytes = b.flat.numel() * b.flat.element_size()
        self.timeline.add("bucket_allreduce", t0, time.perf_counter(), bucket=b.index,
                          bytes=nbytes)

    # -- the communication thread (overlap thread) ----------------------------------------
    def _queue_work(self, kind: str, b) -> None:
        """Hand bucket b's `kind` of reduction to the communication thread (started on first
        use)."""
        if self._worker is None:
            self._start_worker()
        self._queue.put((kind, b))

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
            item = self._queue.get()
            if item is None:
                return
            kind, b = item
            try:
                if self._worker_error is None:
                    {"allreduce": self._allreduce_mean, "reduce_scatter": self._reduce_scatter_mean,
                     "allgather": self._allgather_values}[kind](b)
            except BaseException as e:  # re-raised in the training thread by synchronize()
                self._worker_error = e
            finally:
                (b.gathered if kind == "allgather" else b.done).set()

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

    def _synchronize_buckets(self):
        """synchronize(), unsharded: every bucket started, its allreduce done and the mean
        in its memory; each parameter's .grad its view (None where no rank had one)."""
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
                wire.average(b, self.op, self.predivide_factor, self.size)
            b.request = None
            used = b.flags.tolist()  # one read per bucket, not one tensor op per parameter
            for i, p in enumerate(b.params):
                if used[i] > 0:
                    if not b.is_view(i, p.grad):
                        p.grad = b.view(i)
                else:
                    p.grad = None  # no rank produced a gradient: skip it everywhere
