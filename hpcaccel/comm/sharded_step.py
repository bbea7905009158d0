"""The mpi reducer's sharded step (shard optimizer | gradients; sharding.py).

Sharding: a complete bucket is reduce-scattered instead of allreduced (the ring's first half
across hosts, the library's MPI_Reduce_scatter on one host), so each rank holds the reduced
gradient of its part of the bucket only, and the parameters' .grad are None after
synchronize(). step() steps this rank's part of the optimizer (1/size of its state), then
queues each bucket's allgather of the updated values, the first layer's bucket first, and
returns: the next forward starts at once, each module waiting (forward pre-hook) only for
the bucket holding its own parameters. With `gradients` a bucket's full-size gradient
buffer is lent from a small pool while backward fills it and given back after its
reduce-scatter; only this rank's part is kept.

Cross-rank invariants: every rank reduce-scatters the same buckets in index order (the
reducer's launching, overlap.py), sums every bucket's used flags in one allreduce in
synchronize(), and allgathers the buckets in the order the sharded optimizer steps them,
the same on every rank (sharding.py).
"""
from __future__ import annotations

import contextlib
import time

import torch

from ..departure import check
from ..optim import clip_grad_norm_
from .algorithms import LibraryShards
from .buckets import Bucket
from .sharding import ShardedOptimizer

# shard gradients: full-size gradient buffers lent to buckets while backward runs. Two: one
# being filled while the previous one is reduce-scattered.
POOL_BUFFERS = 2


class ShardedStep:
    """MPIReducer's sharded step (mpi.py): set-up, lending gradient buffers, reduce-scatter,
    synchronize, clipping, the per-bucket optimizer step and allgather, checkpoints' whole
    state. State: sharded (the ShardedOptimizer, None unsharded), _shard_ops, _forward_waits,
    and the pool: _pool, _lent and _pool_lock (set up by the reducer)."""

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

    def _lend(self, b: Bucket) -> None:
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

    def _give_back(self, b: Bucket) -> None:
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

    def _reduce_scatter_mean(self, b: Bucket):
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

    def _allgather_values(self, b: Bucket):
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
                self._queue_work("allgather", b)
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

