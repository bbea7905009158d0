"""Horovod's helper functions (horovod.torch.functions, 0.28.1 semantics): broadcasting a
model's parameters and an optimizer's state from one rank, and moving Python objects.

Objects travel pickled (cloudpickle where installed, as Horovod does, else pickle) through
the same engine as tensors: ordered with them, and checked like them, so a rank calling
broadcast_object while another calls allreduce is an error on both, not a hang.
"""
from __future__ import annotations

import collections
import pickle

import torch

from .basics import runtime
from .calls import op_name, run_now, synchronize
from .engine import Operation
from .mpi_ops import broadcast_async_
from .process_sets import check_process_set, global_process_set


def _dumps(obj) -> bytes:
    try:
        import cloudpickle
    except ImportError:
        return pickle.dumps(obj)
    return cloudpickle.dumps(obj)


class _ObjectOp(Operation):
    def __init__(self, kind, name, payload, root=None, auto_named=None):
        super().__init__(name, auto_named)
        self.kind, self.payload, self.root = kind, payload, root

    def fields(self):
        return [] if self.root is None else [f"root {self.root}"]

    def layout(self):
        return (type(self), self.kind, self.root)

    def nbytes(self):
        return len(self.payload or b"")

    def run(self, comm):
        if self.root is None:
            return [pickle.loads(b) for b in comm.allgather(self.payload)]
        data = comm.bcast(self.payload if comm.Get_rank() == self.root else None, root=self.root)
        return pickle.loads(data)


def broadcast_object(obj, root_rank=0, name=None, process_set=global_process_set):
    """root_rank's `obj` on every rank (other ranks' `obj` is ignored)."""
    check_process_set(process_set)
    rt = runtime()
    if not 0 <= int(root_rank) < rt.size:
        raise ValueError(f"broadcast_object: root_rank {root_rank} is not a rank (0..{rt.size - 1})")
    payload = _dumps(obj) if rt.rank == int(root_rank) else None
    # Horovod names it after type(obj), which differs where non-root ranks pass None (and
    # then never matches there); a generated name does not depend on the object
    name, auto_named = op_name(name, "broadcast_object")
    return run_now(_ObjectOp("broadcast_object", name, payload, int(root_rank), auto_named))


def allgather_object(obj, name=None):
    """Every rank's `obj`, as a list by rank."""
    name, auto_named = op_name(name, "allgather_object")
    return run_now(_ObjectOp("allgather_object", name, _dumps(obj), auto_named=auto_named))


def broadcast_parameters(params, root_rank):
    """Overwrite parameters (or any tensors) with root_rank's, in place: a state_dict
    (broadcast in sorted key order) or a list of tensors or of (name, tensor) pairs,
    e.g. model.named_parameters()."""
    if isinstance(params, dict):
        params = sorted(params.items())
    elif isinstance(params, list):
        params = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError(f"invalid params of type: {type(params)}")
    handles = []
    for name, p in params:
        tensor = p.data if isinstance(p, torch.nn.Parameter) else p
        handles.append(broadcast_async_(tensor, root_rank, name))
    for handle in handles:
        synchronize(handle)


def _raw_step(optimizer) -> None:
    """A step of the wrapped optimizer itself: a DistributedOptimizer's own step() would
    reduce gradients, which only works if every rank steps (all do here, but Horovod's
    semantics are a local step)."""
    if getattr(type(optimizer), "_hpcaccel_distributed", False):
        super(type(optimizer), optimizer).step()
    else:
        optimizer.step()


def _broadcast_sharded_options(optimizer, reducer, root_rank) -> None:
    """A sharded DistributedOptimizer: the ranks' parts together are its one state, so there
    is no other rank's state to take; root_rank's options are given to every rank, then a
    state still empty on every rank gets Horovod's step on zero gradients (on each rank's
    part; the updated parameters are allgathered), as unsharded."""
    sharded = reducer.sharded
    # root's options first, so the step below is the same on every rank's part
    options = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    for group, theirs in zip(optimizer.param_groups, broadcast_object(options, root_rank)):
        group.update(theirs)
    if not any(allgather_object(sharded.has_state())):
        for piece in sharded.pieces:
            piece.tensor.grad = torch.zeros_like(piece.tensor)
        reducer.step()
        reducer.wait_parameters()


def broadcast_optimizer_state(optimizer, root_rank, model=None):
    """Overwrite the optimizer's state and options (lr, momentum, ...) with root_rank's.

    As Horovod: an optimizer whose state is still empty first gets it by one step on zero
    gradients (which leaves .grad zeros, counts a step in Adam-like optimizers, and moves
    parameters only through weight decay); LBFGS is refused."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    reducer = getattr(optimizer, "_hvd_reducer", None)
    if reducer is not None and reducer.sharded is not None:
        _broadcast_sharded_options(optimizer, reducer, root_rank)
        return
    state_dict = optimizer.state_dict()
    sparse = set()
    if model is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding) and m.sparse:
                sparse.update(id(p) for p in m.parameters())
    if len(state_dict["state"]) == 0:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
                    if isinstance(optimizer, torch.optim.SparseAdam) or (
                            isinstance(optimizer, torch.optim.SGD) and id(p) in sparse):
                        p.grad = p.grad.to_sparse()
        _raw_step(optimizer)
        state_dict = optimizer.state_dict()
    if len(state_dict["state"]) == 0:
        return  # a stateless optimizer: nothing to broadcast
    tensors, scalars, assign = [], {}, {}
    occurrences = collections.defaultdict(int)
    live_state = optimizer.state_dict()["state"]  # tensors shared with optimizer.state
    for index, group in enumerate(state_dict["param_groups"]):
        for key, value in group.items():
            if key != "params":
                scalars[f"{key}.{index}"] = value
                assign[f"{key}.{index}"] = (lambda v, i=index, k=key:
                                            optimizer.param_groups[i].__setitem__(k, v))
        for pid in group["params"]:
            if pid not in live_state:
                continue
            for name, value in live_state[pid].items():
                occurrences[name] += 1
                key = f"{name}.{occurrences[name]}"
                if torch.is_tensor(value):
                    tensors.append((key, value))
                else:
                    scalars[key] = value
                    # live_state[pid] is optimizer.state[param] itself (state_dict packs it
                    # without copying), so assigning there updates the optimizer
                    assign[key] = lambda v, d=live_state[pid], name=name: d.__setitem__(name, v)
    broadcast_parameters(tensors, root_rank)
    for key, value in broadcast_object(scalars, root_rank).items():
        assign[key](value)

