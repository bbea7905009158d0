"""hvd.DistributedOptimizer: Horovod 0.28.1's, with the gradients averaged by hpcaccel's
MPIReducer (hpcaccel/comm/mpi.py), the reducer `python -m hpcaccel.train --backend mpi`
uses: buckets, allreduce overlapped with backward on a communication thread, the
allreduce algorithm and bucket size chosen for the job's hosts, 16-bit wire and PowerSGD.
One reducer, two front doors: the training CLI, and Horovod scripts through this module.

    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    for x, y in batches:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()     # allreduces start as gradients become ready
        optimizer.step()                    # waits for them, then the wrapped step

Sharded (shard="optimizer" | "gradients", hpcaccel/comm/sharding.py): each rank steps only
its part of the optimizer (1/size of its state; with "gradients" it keeps only its part of
the reduced gradient too), then the updated parameters are allgathered. After synchronize()
.grad is None; clip with optimizer.clip_grad_norm_() (or Horovod's recipe with
torch.nn.utils.clip_grad_norm_, routed there: torch/clipping.py); state_dict() is collective.

Cross-rank invariants:
  * Every rank wraps an optimizer over the same parameters (same shapes, dtypes, order)
    with the same options; construction checks it (one allgather) and fails on every rank
    otherwise, so buckets are laid out alike everywhere (see hpcaccel/comm/mpi.py).
  * synchronize() and step() are called by every rank in the same order (as in Horovod).
    The one vote it may take (a second synchronize() before step()) is decided by flags
    that change only in those calls, hence the same on every rank.
  * Sharded, clip_grad_norm_(), state_dict() and the Job's checkpoints are collective as
    well: every rank calls them, in the same order.
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
import weakref

import torch

from ..config import SHARDS
from ..departure import PeerLeft
from ..timeline import NullTimeline
from . import basics
from .basics import Average, runtime
from .compression import Compression
from .optimizer_args import _bucket_bytes, _check_groups, _check_op, _named, _reducer_compression
from .process_sets import check_process_set, global_process_set

_CLASSES: dict[type, type] = {}  # wrapped optimizer class -> its distributed subclass


class _ScriptTimeline(NullTimeline):
    """The reducer's timeline: hvd.start_timeline()'s while one records, else nothing."""

    def add(self, *args, **kwargs):
        rt = basics._runtime
        if rt is not None and rt.timeline is not None:
            rt.timeline.add(*args, **kwargs)


def _close(reducer) -> None:
    """Remove the reducer's hooks and free its communicator (when the optimizer goes away
    or at exit)."""
    from mpi4py import MPI

    if MPI.Is_finalized():
        return
    reducer.close()


class _DistributedMethods:
    """What a distributed optimizer adds to the optimizer it wraps. Not a base class: each
    wrapped optimizer class gets a subclass of its own with these functions in it
    (_subclass), so `super(type(opt), opt).step()` still reaches the wrapped step."""

    _hpcaccel_distributed = True

    def synchronize(self):
        """Wait until every gradient is reduced over the ranks: .grad then holds the mean
        (or sum) over ranks, identical on every rank; a parameter without a gradient on any
        rank keeps .grad None. Collective. Call it before changing gradients in place
        (clipping, unscaling), then step() inside skip_synchronize()."""
        reducer = self._hvd_reducer
        if reducer.size > 1:
            # Called again before step(): reduce only if some rank got gradients since the
            # last reduction (a vote), else .grad already holds the result. The flag is the
            # same on every rank (see the module's invariants), so all vote or none does.
            again = self._hvd_synchronized
            if not again or runtime().control.any(reducer.pending):
                try:
                    reducer.synchronize()
                except PeerLeft as e:  # Horovod's error for a collective that cannot complete
                    raise basics.HorovodInternalError(str(e)) from None
        self._hvd_synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """step() inside this context does not synchronize: for a step after an explicit
        synchronize(), e.g.

            optimizer.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            with optimizer.skip_synchronize():
                optimizer.step()
        """
        self._hvd_should_synchronize = False
        try:
            yield
        finally:
            self._hvd_should_synchronize = True

    def step(self, closure=None):
        """synchronize() (unless inside skip_synchronize()), then the wrapped optimizer's
        step. A closure goes to the wrapped step, as in Horovod: the backward it runs there
        counts toward the next step's reduction. Sharded: this rank steps its part, then the
        updated parameters are allgathered (under the next forward of `module`, else before
        step() returns); no closure (its backward would overwrite the reduced gradients)."""
        reducer = self._hvd_reducer
        if reducer.sharded is not None and closure is not None:
            raise ValueError("optimizer.step(closure) with shard: the closure's backward "
                             "would overwrite the reduced gradients this rank steps with; "
                             "call the closure before step()")
        if self._hvd_should_synchronize:
            if self._hvd_synchronized:
                # Horovod 0.28.1's text, word for word: scripts filter warnings on it
                warnings.warn("optimizer.step() called without "
                              "optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training "
                              "slowdown. You may want to consider using "
                              "optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.")
            self.synchronize()
        self._hvd_synchronized = False
        if reducer.sharded is not None:
            reducer.step()
            return None
        base = self._hvd_base
        return base.step(self) if closure is None else base.step(self, closure)

    # torch wraps an optimizer class's step for its profiler and step hooks when an instance
    # is made or loads a state; the wrapped class's step already is, so the hooks run once.
    step.hooked = True

    def clip_grad_norm_(self, max_norm: float, parameters=None) -> torch.Tensor:
        """hpcaccel's: torch.nn.utils.clip_grad_norm_(params, max_norm) over the reduced
        gradients, returning their total 2-norm; after synchronize(), before step() inside
        skip_synchronize(). Sharded, the way to clip (.grad is None there), and collective:
        each rank clips its part by the norm of the whole gradient (of `parameters`, some of
        this optimizer's, where given: the same on every rank). Sharded,
        torch.nn.utils.clip_grad_norm_ on its parameters comes here (torch/clipping.py)."""
        if not self._hvd_synchronized:
            raise RuntimeError("optimizer.clip_grad_norm_() clips the reduced gradients: "
                               "call optimizer.synchronize() first, then step() inside "
                               "optimizer.skip_synchronize()")
        return self._hvd_reducer.clip_grad_norm_(
            max_norm, None if parameters is None else list(parameters))

    def wait_parameters(self) -> None:
        """hpcaccel's. Sharded with `module`: wait until step()'s updated parameters have
        all arrived, before reading them other than through that module's forward (which
        waits by itself). Otherwise nothing to wait for. Local."""
        self._hvd_reducer.wait_parameters()

    @contextlib.contextmanager
    def _hvd_whole_state(self):
        """Sharded, collective: within it the optimizer holds the whole state on rank 0
        (gathered from every rank's part; the other ranks hold none), state_dict() is local
        and the parameters are complete. One agreement on hvd's engine first: a rank that
        calls it alone waits there, named, instead of mixing its gathers with the others'
        gradients. Unsharded: nothing to do."""
        reducer = self._hvd_reducer
        if reducer.sharded is None or self._hvd_whole:
            yield
            return
        from .functions import broadcast_object
        broadcast_object(None, 0, name="DistributedOptimizer.state_dict (sharded: collective)")
        with reducer.full_optimizer_state():
            self._hvd_whole = True
            try:
                yield
            finally:
                self._hvd_whole = False

    def state_dict(self):
        """The wrapped state_dict(). Sharded: collective (every rank calls it); rank 0 gets
        the whole, unsharded state (what the unsharded optimizer's state_dict() holds), the
        other ranks the param_groups with an empty "state"."""
        with self._hvd_whole_state():
            return self._hvd_base.state_dict(self)

    def zero_grad(self, set_to_none: bool = True):
        """The wrapped zero_grad(); an AssertionError (Horovod's) after backward() and
        before step() or synchronize(), while gradients are being reduced."""
        if self._hvd_reducer.pending:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() and "
                                 "before optimizer.step() or optimizer.synchronize(): this "
                                 "step's gradients are not reduced yet, and zeroing them would "
                                 "race with their allreduce. Call step() or synchronize() "
                                 "first.")
        base = self._hvd_base
        return base.zero_grad(self) if set_to_none is True else base.zero_grad(self, set_to_none)

    def set_backward_passes_per_step(self, passes):
        """From now on each parameter's allreduce starts after its `passes`-th backward of
        the step (counts restart, as in Horovod). The same value on every rank."""
        self._hvd_reducer.set_backward_passes_per_step(passes)
        self.backward_passes_per_step = passes

    def load_state_dict(self, state_dict):
        """The wrapped load_state_dict(); the backward passes counted so far start again
        (as in Horovod). Local: rank 0 alone may load, then broadcast_optimizer_state().
        Sharded: every rank loads the whole state (from rank 0's state_dict()) and keeps
        its part of it; broadcast_optimizer_state() does not apply."""
        self._hvd_should_synchronize = True
        self._hvd_reducer.set_backward_passes_per_step(self.backward_passes_per_step)
        loaded = self._hvd_base.load_state_dict(self, state_dict)
        self._hvd_reducer.optimizer_state_loaded()  # sharded: this rank keeps its part
        return loaded

    def add_param_group(self, param_group):
        """Not after wrapping: the new parameters' gradients would not be reduced and the
        ranks would drift apart silently (Horovod ignores them so)."""
        from .unsupported import not_supported
        not_supported("add_param_group() on a DistributedOptimizer",
                      instead="add the group to the optimizer before wrapping it")


_METHODS = {name: value for name, value in vars(_DistributedMethods).items()
            if not name.startswith("__")}


def _subclass(base: type) -> type:
    """The distributed subclass of optimizer class `base` (one per class, cached): its
    instances pass isinstance(opt, base) and keep base's name, as Horovod's do."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (base,), {**_METHODS, "_hvd_base": base,
                                            "__module__": base.__module__,
                                            "__doc__": base.__doc__})
        cls.__qualname__ = base.__qualname__
        _CLASSES[base] = cls
    return cls


def DistributedOptimizer(optimizer, named_parameters=None, compression=Compression.none,
                         backward_passes_per_step=1, op=Average, gradient_predivide_factor=1.0,
                         num_groups=0, groups=None, sparse_as_dense=False, process_set=None,
                         *, shard="none", module=None):
    """Wrap `optimizer` so that its step() applies gradients averaged over all ranks.

    Collective: every rank wraps an optimizer over the same parameters with the same
    arguments. Returns an instance of a subclass of the optimizer's class (isinstance
    holds) that shares the optimizer's state and param_groups; keep using the returned one.

    As Horovod's: during backward each parameter's gradient is reduced as soon as it is
    ready (after its `backward_passes_per_step`-th backward pass of the step; earlier ones
    accumulate locally). step() waits for the reductions (synchronize()) and then runs the
    wrapped step. synchronize(), skip_synchronize() and set_backward_passes_per_step(n) are
    there; zero_grad() raises while reductions are pending. A parameter without a gradient
    on some rank contributes zeros there (its .grad, if the script kept one).

    optimizer: a torch.optim.Optimizer over float32/float64 parameters.
    named_parameters: (name, parameter) pairs naming every parameter of the optimizer,
        usually model.named_parameters(); names must be unique. None: generated names.
    compression: hvd.Compression.none (default), fp16 or bf16 (gradients travel as 16-bit
        floats, summed in 16 bits), or powersgd(rank, start_step) (low-rank factors with
        error feedback). Other compressors: ValueError.
    backward_passes_per_step: backward passes per step (gradient accumulation).
    op: hvd.Average (the mean over ranks) or hvd.Sum. hvd.Adasum only at one rank (where it
        changes nothing); Min, Max and Product are not supported for gradients.
    gradient_predivide_factor: with op Average, gradients are scaled by 1/f before the sum
        and by f/size after it.
    num_groups, groups: accepted and checked as Horovod does (num_groups is deprecated for
        groups), and otherwise unused: the reducer fuses gradients into buckets of its own
        size (HOROVOD_FUSION_THRESHOLD bytes where set).
    sparse_as_dense: accepted; sparse gradients (nn.Embedding(sparse=True)) are always
        made dense at more than one rank, whatever its value, and stay dense after the step
        (optimizers that need sparse gradients, such as SparseAdam, do not fit).
    process_set: only the global one (None or hvd.global_process_set).

    hpcaccel's own, keyword-only:
    shard: "none" (default); "optimizer": each rank keeps and steps 1/size of the optimizer
        state (ZeRO stage 1), its part of each bucket reduce-scattered, the updated
        parameters allgathered after step(); "gradients": and keeps only its part of the
        reduced gradient (stage 2). Results as unsharded for elementwise optimizers (SGD,
        Adam, AdamW, ...) and hpcaccel's LARS, not for those that need a whole parameter
        (LAMB, Adafactor); CPU parameters only; not with powersgd.
        Then .grad is None after synchronize(): clip with optimizer.clip_grad_norm_();
        state_dict() is collective; load_state_dict() on every rank.
    module: the nn.Module whose forward uses the parameters, all of the optimizer's
        trainable ones (its order lays out the buckets): sharded, its next forward starts
        while the updated parameters arrive, each submodule waiting for its own; without
        it step() waits for them all. Read parameters outside its forward only after
        optimizer.wait_parameters().

    Where it differs from Horovod: a parameter that has no gradient on any rank keeps .grad
    None, so the wrapped optimizer skips it (Horovod gives it zeros, which momentum and
    weight decay then apply); a second synchronize() before step() reduces again only if
    some rank got new gradients since the first; add_param_group() after wrapping raises.
    """
    rt = runtime()
    # Horovod's checks first, in Horovod's order, then what hpcaccel adds.
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be "
                      "removed in v0.23.0.", DeprecationWarning)
        if groups is None:
            groups = num_groups
    if (isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int)
            or backward_passes_per_step <= 0):
        raise ValueError(f"backward_passes_per_step must be an integer > 0, "
                         f"got {backward_passes_per_step!r}")
    if getattr(type(optimizer), "_hpcaccel_distributed", False):
        raise ValueError("the optimizer is a DistributedOptimizer already; wrap the plain one")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    check_process_set(process_set)
    reduce_op = _check_op(op, rt.size)
    wire, wire_options = _reducer_compression(compression)
    if shard not in SHARDS or (shard != "none" and wire == "powersgd"):
        raise ValueError(f"DistributedOptimizer(shard={shard!r}): shard must be one of "
                         f"{', '.join(SHARDS)}, and none with compression powersgd (its "
                         f"low-rank factors of whole matrices cannot be reduce-scattered)")
    named = _named(optimizer, named_parameters)
    _check_groups(groups)
    bucket_bytes = _bucket_bytes()

    params = list({id(p): p for group in optimizer.param_groups for p in group["params"]
                   if p.requires_grad}.values())
    if module is not None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"DistributedOptimizer(module=...) takes a torch.nn.Module, got "
                            f"{type(module).__name__}")
        in_module = [p for p in module.parameters() if p.requires_grad]
        if {id(p) for p in in_module} != {id(p) for p in params}:
            raise ValueError("DistributedOptimizer(module=...): the module's trainable "
                             "parameters must be the optimizer's, all of them")
        params = in_module  # the reducer lays the buckets out in the module's order
    # Collective: the same parameters and options everywhere, or an error on every rank
    # (different buckets would mix one rank's gradients with another's).
    layout = repr(([(tuple(p.shape), str(p.dtype), p.device.type) for p in params], wire,
                   wire_options, reduce_op, float(gradient_predivide_factor),
                   backward_passes_per_step, bucket_bytes, shard))
    digest = hashlib.sha256(layout.encode()).hexdigest()
    digests = rt.control.allgather(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"DistributedOptimizer: rank(s) {differ[:8]} wrap parameters (shapes, "
                         f"dtypes, order) or options other than rank 0's; every rank must wrap "
                         f"the same model's optimizer with the same arguments")

    from ..comm.mpi import MPIReducer
    reducer = MPIReducer(comm=rt.comm, bucket_bytes=bucket_bytes, compression=wire,
                         timeline=_ScriptTimeline(), op=reduce_op,
                         predivide_factor=gradient_predivide_factor,
                         backward_passes_per_step=backward_passes_per_step, shard=shard,
                         **wire_options)
    reducer.too_many_passes_hint = (
        f"Gradients were computed more than backward_passes_per_step="
        f"{backward_passes_per_step} times before step(); raise backward_passes_per_step "
        f"to accumulate gradients locally")

    cls = _subclass(type(optimizer))
    opt = cls.__new__(cls)
    # The same state and param_groups objects as the wrapped optimizer (no copy); an
    # instance-level step (an LR scheduler's counter around the wrapped object's step)
    # would bypass synchronization and is left behind.
    opt.__dict__.update({k: v for k, v in vars(optimizer).items()
                         if k not in ("step", "zero_grad")})
    opt._compression = compression
    opt._parameter_names = {p: name for name, p in sorted(named, key=lambda item: item[0])}
    opt.backward_passes_per_step = backward_passes_per_step
    opt.op = op
    opt.gradient_predivide_factor = gradient_predivide_factor
    opt.sparse_as_dense = sparse_as_dense
    opt.process_set = global_process_set if process_set is None else process_set
    opt._groups = groups
    opt._hvd_reducer = reducer
    opt._hvd_synchronized = False
    opt._hvd_should_synchronize = True
    opt._hvd_whole = False  # inside _hvd_whole_state()
    # The reducer refers to the optimizer weakly: the hooks on the parameters keep the
    # reducer alive, not the optimizer, whose end closes the reducer. Sharded, it builds an
    # optimizer of the wrapped class for this rank's part from it, so it gets a twin: an
    # instance of that class sharing the wrapper's attributes (state and param_groups, also
    # when load_state_dict() replaces them).
    if shard == "none":
        target = weakref.proxy(opt)
    else:
        target = cls._hvd_base.__new__(cls._hvd_base)
        target.__dict__ = opt.__dict__
    try:
        reducer.attach(module if module is not None else params, target)
        reducer.optimizer_state_loaded()  # sharded: a state it holds already, split
    except BaseException:
        reducer.close()
        raise
    opt._hvd_finalizer = weakref.finalize(opt, _close, reducer)
    if rt.size > 1:  # every step's exchange agreed on the engine (exchange.py)
        from .exchange import agree_each_exchange
        agree_each_exchange(reducer, rt)
    if shard != "none":
        from .clipping import register
        register(opt)  # Horovod's recipe, torch.nn.utils.clip_grad_norm_, clips globally
    return opt


__all__ = ["DistributedOptimizer"]
