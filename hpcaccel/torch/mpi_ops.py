"""Horovod's tensor collectives (horovod.torch.mpi_ops, 0.28.1 names, signatures and
semantics) on hpcaccel's collective engine (engine.py).

Names without a trailing `_` are out of place and differentiable (Horovod's gradients:
allreduce -> the same allreduce of the gradient; allgather -> averaged allreduce, then this
rank's rows; broadcast -> averaged allreduce, zero except on the root; reducescatter ->
allgather of the gradient, times size under Sum and times both factors). Names with `_` work
in place. `*_async*` return an int handle for poll() and synchronize(); the operation runs
in the engine's thread meanwhile. Tensors on a GPU go through a host copy.
"""
from __future__ import annotations

import math
import warnings

import torch

from . import reduce_ops
from .basics import Adasum, Average, Max, Min, OP_NAMES, Product, Sum, runtime
from .compression import Compression
from .engine import Operation
from .join_ops import join  # noqa: F401 - Horovod's name, here with the other collectives
from .process_sets import check_process_set, global_process_set

# -- operations (run in the engine thread) -------------------------------------------------


def _host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with t's values: t itself when it already is one."""
    return t if t.device.type == "cpu" and t.is_contiguous() else t.detach().cpu().contiguous()


def _meta(t: torch.Tensor, skip_first: bool = False) -> str:
    shape = list(t.shape[1:]) if skip_first else list(t.shape)
    return f"{str(t.dtype).replace('torch.', '')}{shape}"


class AllreduceOp(Operation):
    kind = "allreduce"

    def __init__(self, name, inputs, outputs, op, prescale, postscale, single):
        super().__init__(name)
        self.inputs, self.outputs, self.single = inputs, outputs, single
        self.op, self.prescale, self.postscale = op, float(prescale), float(postscale)

    def fields(self):
        scales = [f"prescale {self.prescale:g}"] if self.prescale != 1 else []
        scales += [f"postscale {self.postscale:g}"] if self.postscale != 1 else []
        return [f"op {OP_NAMES[self.op]}", *scales] + [_meta(t) for t in self.inputs]

    def join_spec(self):
        """A joined rank reduces zeros of the same dtypes and shapes (join_ops.py)."""
        from .join_ops import spec
        return spec(self, "allreduce", [(str(t.dtype), tuple(t.shape)) for t in self.inputs],
                    self.op, self.prescale, self.postscale)

    def run(self, comm):
        size = comm.Get_size()
        if self.op == Average and any(t.dtype == torch.bool for t in self.inputs):
            raise ValueError("Average of bool tensors is undefined; use op=Sum or Max")
        op = Sum if self.op in (Average, Adasum) else self.op
        post = self.postscale / size if self.op == Average else self.postscale
        # one fused buffer per dtype (a grouped allreduce is one operation, as in Horovod)
        by_dtype = {}
        for i, t in enumerate(self.inputs):
            by_dtype.setdefault(t.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            if len(idx) == 1:
                i = idx[0]
                host = _host(self.inputs[i])
                in_place = host is self.outputs[i]  # a contiguous CPU tensor, in place: zero copy
                buf = host if in_place or host is not self.inputs[i] else host.clone()
            else:
                buf = torch.cat([_host(self.inputs[i]).reshape(-1) for i in idx])
            with torch.no_grad():
                reduce_ops.scale_(buf, self.prescale)
                if buf.numel():
                    runtime().engine.algorithm().allreduce_(reduce_ops.as_array(buf),
                                                            reduce_ops.mpi_op(dtype, op))
                reduce_ops.scale_(buf, post)
                offset = 0
                for i in idx:
                    out = self.outputs[i]
                    if out is not buf:
                        out.copy_(buf.view(-1)[offset:offset + out.numel()].view(out.shape))
                    offset += out.numel()
        return self.outputs[0] if self.single else self.outputs


class AllgatherOp(Operation):
    kind = "allgather"

    def __init__(self, name, inputs, single):
        super().__init__(name)
        self.inputs, self.single = inputs, single

    def fields(self):
        return [_meta(t, skip_first=True) for t in self.inputs]

    def after_agree(self, comm):
        """Everything but the first dimensions matched; now the first dimensions every
        rank needs to place the rows."""
        self.rows = comm.allgather([t.shape[0] if t.dim() else -1 for t in self.inputs])
        if any(r == -1 for rows in self.rows for r in rows):
            return f"allgather {self.name!r}: tensors need at least one dimension"
        return None

    def run(self, comm):
        results = []
        for k, t in enumerate(self.inputs):
            host = _host(t)
            rows = [per_rank[k] for per_rank in self.rows]
            row_numel = host[0].numel() if host.shape[0] else int(torch.tensor(host.shape[1:]).prod())
            out = torch.empty((sum(rows), *host.shape[1:]), dtype=host.dtype)
            counts = [r * row_numel for r in rows]
            send, recv = reduce_ops.as_array(host), reduce_ops.as_array(out)
            if isinstance(send, list):
                comm.Allgatherv(send, [recv[0], counts, None, recv[1]])
            else:
                comm.Allgatherv(send, [recv, counts])
            results.append(out.to(t.device))
        return results[0] if self.single else results


class BroadcastOp(Operation):
    kind = "broadcast"

    def __init__(self, name, tensor, output, root):
        super().__init__(name)
        self.tensor, self.output, self.root = tensor, output, int(root)

    def fields(self):
        return [f"root {self.root}", _meta(self.tensor)]

    def nbytes(self):
        return self.tensor.numel() * self.tensor.element_size()

    def run(self, comm):
        host = _host(self.tensor)
        if host is self.output:
            buf = host  # in place on a contiguous CPU tensor: zero copy
        else:
            buf = host.clone() if host is self.tensor else host
        if buf.numel():
            comm.Bcast(reduce_ops.as_array(buf), root=self.root)
        if buf is not self.output:
            with torch.no_grad():
                self.output.copy_(buf.view(self.output.shape))
        return self.output


def split_rows(rows: int, size: int) -> list[int]:
    """Horovod's split of a first dimension over `size` ranks: rows // size each, and one
    more for each of the first rows % size ranks."""
    base, extra = divmod(rows, size)
    return [base + (r < extra) for r in range(size)]


class ReducescatterOp(Operation):
    """Sum over ranks, then rank r keeps its split_rows() share of the first dimension: one
    MPI_Reduce_scatter per dtype (a grouped call is fused, as Horovod fuses it)."""

    kind = "reducescatter"

    def __init__(self, name, inputs, op, prescale, postscale, single):
        super().__init__(name)
        self.inputs, self.single = inputs, single
        self.op, self.prescale, self.postscale = op, float(prescale), float(postscale)

    fields = AllreduceOp.fields  # op, factors, every dtype and whole shape must match

    def run(self, comm):
        size, me = comm.Get_size(), comm.Get_rank()
        if self.op == Average and any(t.dtype == torch.bool for t in self.inputs):
            raise ValueError("Average of bool tensors is undefined; use op=Sum")
        post = self.postscale / size if self.op == Average else self.postscale
        results = [None] * len(self.inputs)
        by_dtype = {}
        for i, t in enumerate(self.inputs):
            by_dtype.setdefault(t.dtype, []).append(i)
        with torch.no_grad():
            for dtype, idx in by_dtype.items():
                hosts = [_host(self.inputs[i]) for i in idx]
                splits = [split_rows(h.shape[0], size) for h in hosts]
                row = [math.prod(h.shape[1:]) for h in hosts]
                counts = [sum(s[r] * n for s, n in zip(splits, row)) for r in range(size)]
                if len(idx) == 1:
                    # one tensor's rows already lie rank after rank: send it as it is,
                    # copying only to prescale without touching the caller's tensor
                    send = hosts[0]
                    if self.prescale != 1 and send is self.inputs[idx[0]]:
                        send = send.clone()
                else:
                    # fused: every tensor's rows for rank 0, then for rank 1, ... (the
                    # layout Reduce_scatter's per-rank counts address)
                    send = torch.cat([h.narrow(0, sum(s[:r]), s[r]).reshape(-1)
                                      for r in range(size) for h, s in zip(hosts, splits)])
                reduce_ops.scale_(send, self.prescale)
                recv = torch.empty(counts[me], dtype=dtype)
                if sum(counts):  # the same on every rank: shapes agreed
                    src, dst = reduce_ops.as_array(send), reduce_ops.as_array(recv)
                    comm.Reduce_scatter(src, dst, counts, op=reduce_ops.mpi_op(dtype, Sum))
                reduce_ops.scale_(recv, post)
                offset = 0
                for i, h, s, per_row in zip(idx, hosts, splits, row):
                    n = s[me] * per_row
                    out = recv[offset:offset + n].view(s[me], *h.shape[1:])
                    offset += n
                    # a grouped call's outputs are separate tensors, not views of one buffer
                    results[i] = (out if len(idx) == 1 else out.clone()).to(self.inputs[i].device)
        return results[0] if self.single else results


class BarrierOp(Operation):
    kind = "barrier"

    def join_spec(self):
        from .join_ops import spec
        return spec(self, "barrier")

    def run(self, comm):
        return None  # agreeing on the barrier already waited for every rank


# -- argument handling as Horovod does it --------------------------------------------------


def handle_average_backwards_compatibility(op, average):
    """Horovod's deprecated `average=`: True -> Average, False -> Sum; both given is an
    error; neither -> Average."""
    if op is not None:
        if average is not None:
            raise ValueError("The op parameter supersedes average. Please provide only one of them.")
        return op
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed "
                      "in v1.0", DeprecationWarning)
        return Average if average else Sum
    return Average


def _check_op(op) -> None:
    if op not in OP_NAMES:
        raise ValueError(f"op must be one of hvd.Average, Sum, Adasum, Min, Max, Product; got {op!r}")
    if op == Adasum and runtime().size > 1:
        from .unsupported import not_supported
        not_supported("op=Adasum at more than one rank", instead="op=hvd.Average")


def _name(name, kind):
    return name if name is not None else runtime().engine.auto_name(kind)


def _submit(op: Operation) -> int:
    return runtime().engine.submit(op)


# -- allreduce -------------------------------------------------------------------------------


def _allreduce_async(tensors, outputs, name, op, prescale_factor, postscale_factor, process_set,
                     kind="allreduce"):
    check_process_set(process_set)
    _check_op(op)
    for t in tensors:
        reduce_ops.check_tensor(t, kind)
    return _submit(AllreduceOp(_name(name, kind), list(tensors), list(outputs), op,
                               prescale_factor, postscale_factor, single=kind == "allreduce"))


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                    postscale_factor=1.0, process_set=global_process_set):
    """Start reducing `tensor` over all ranks (default: the average) into a new tensor;
    returns a handle. `tensor` is not modified."""
    op = handle_average_backwards_compatibility(op, average)
    output = torch.empty_like(tensor)
    return _allreduce_async([tensor], [output], name, op, prescale_factor, postscale_factor,
                            process_set)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                     postscale_factor=1.0, process_set=global_process_set):
    """Start reducing `tensor` in place; returns a handle."""
    op = handle_average_backwards_compatibility(op, average)
    return _allreduce_async([tensor], [tensor], name, op, prescale_factor, postscale_factor,
                            process_set)


class HorovodAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, prescale_factor, postscale_factor):
        ctx.args = (op, prescale_factor, postscale_factor)
        return synchronize(allreduce_async(tensor, None, name, op, prescale_factor,
                                           postscale_factor))

    @staticmethod
    def backward(ctx, grad_output):
        op, pre, post = ctx.args
        return allreduce(grad_output, op=op, prescale_factor=pre, postscale_factor=post), \
            None, None, None, None


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None,
              prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    """`tensor` reduced over all ranks (default: averaged), as a new tensor; differentiable.
    compression: how it travels (Compression.fp16: as float16)."""
    op = handle_average_backwards_compatibility(op, average)
    check_process_set(process_set)
    compressed, ctx = compression.compress(tensor)
    reduced = HorovodAllreduce.apply(compressed, name, op, prescale_factor, postscale_factor)
    return compression.decompress(reduced, ctx)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
               postscale_factor=1.0, process_set=global_process_set):
    """Reduce `tensor` over all ranks in place (default: average); returns it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor,
                                        postscale_factor, process_set))


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                            postscale_factor=1.0, process_set=global_process_set):
    """One fused reduction of a list of tensors into new tensors; returns a handle."""
    op = handle_average_backwards_compatibility(op, average)
    outputs = [torch.empty_like(t) for t in tensors]
    return _allreduce_async(tensors, outputs, name, op, prescale_factor, postscale_factor,
                            process_set, kind="grouped_allreduce")


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                             postscale_factor=1.0, process_set=global_process_set):
    """One fused in-place reduction of a list of tensors; returns a handle."""
    op = handle_average_backwards_compatibility(op, average)
    return _allreduce_async(tensors, tensors, name, op, prescale_factor, postscale_factor,
                            process_set, kind="grouped_allreduce")


class HorovodGroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, prescale_factor, postscale_factor, *tensors):
        ctx.args = (op, prescale_factor, postscale_factor)
        return tuple(synchronize(grouped_allreduce_async(list(tensors), None, name, op,
                                                         prescale_factor, postscale_factor)))

    @staticmethod
    def backward(ctx, *grad_output):
        op, pre, post = ctx.args
        grads = grouped_allreduce(list(grad_output), op=op, prescale_factor=pre,
                                  postscale_factor=post)
        return (None, None, None, None, *grads)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    """A list of tensors reduced in one fused operation, as new tensors; differentiable."""
    op = handle_average_backwards_compatibility(op, average)
    check_process_set(process_set)
    packed = [compression.compress(t) for t in tensors]
    reduced = HorovodGroupedAllreduce.apply(name, op, prescale_factor, postscale_factor,
                                            *[t for t, _ in packed])
    return [compression.decompress(t, ctx) for t, (_, ctx) in zip(reduced, packed)]


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                       postscale_factor=1.0, process_set=global_process_set):
    """Reduce a list of tensors in place in one fused operation; returns the list."""
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor,
                                                postscale_factor, process_set))


def sparse_allreduce_async(tensor, name, op, process_set=global_process_set):
    from .unsupported import not_supported
    not_supported("sparse_allreduce_async", instead="tensor.to_dense() with allreduce_async, or "
                  "DistributedOptimizer(sparse_as_dense=True)")


# -- allgather -------------------------------------------------------------------------------


def _allgather_async(tensors, name, process_set, kind):
    check_process_set(process_set)
    for t in tensors:
        reduce_ops.check_tensor(t, kind)
    return _submit(AllgatherOp(_name(name, kind), list(tensors), single=kind == "allgather"))


def allgather_async(tensor, name=None, process_set=global_process_set):
    """Start concatenating every rank's `tensor` along dimension 0 (which may differ per
    rank); returns a handle."""
    return _allgather_async([tensor], name, process_set, "allgather")


class HorovodAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name):
        check_process_set(None)
        reduce_ops.check_tensor(tensor, "allgather")
        op = AllgatherOp(_name(name, "allgather"), [tensor], single=True)
        result = synchronize(_submit(op))
        ctx.dim, ctx.dims = tensor.shape[0], [rows[0] for rows in op.rows]
        return result

    @staticmethod
    def backward(ctx, grad_output):
        reduced = allreduce(grad_output, op=Average)
        offset = sum(ctx.dims[:runtime().rank])
        return reduced.narrow(0, offset, ctx.dim), None


def allgather(tensor, name=None, process_set=global_process_set):
    """Every rank's `tensor` concatenated along dimension 0 (which may differ per rank);
    differentiable."""
    check_process_set(process_set)
    return HorovodAllgather.apply(tensor, name)


def grouped_allgather_async(tensors, name=None, process_set=global_process_set):
    """Start allgathers of a list of tensors as one operation; returns a handle."""
    return _allgather_async(tensors, name, process_set, "grouped_allgather")


class HorovodGroupedAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, *tensors):
        for t in tensors:
            reduce_ops.check_tensor(t, "grouped_allgather")
        op = AllgatherOp(_name(name, "grouped_allgather"), list(tensors), single=False)
        results = synchronize(_submit(op))
        ctx.dims, ctx.all_dims = [t.shape[0] for t in tensors], op.rows
        return tuple(results)

    @staticmethod
    def backward(ctx, *grad_output):
        reduced = grouped_allreduce(list(grad_output), op=Average)
        me = runtime().rank
        out = []
        for k, g in enumerate(reduced):
            offset = sum(ctx.all_dims[r][k] for r in range(me))
            out.append(g.narrow(0, offset, ctx.dims[k]))
        return (None, *out)


def grouped_allgather(tensors, name=None, process_set=global_process_set):
    """allgather of each tensor of a list, as one operation; differentiable."""
    check_process_set(process_set)
    return list(HorovodGroupedAllgather.apply(name, *tensors))


# -- broadcast -------------------------------------------------------------------------------


def _broadcast_async(tensor, output, root_rank, name, process_set):
    check_process_set(process_set)
    reduce_ops.check_tensor(tensor, "broadcast")
    size = runtime().size
    if not 0 <= int(root_rank) < size:
        raise ValueError(f"broadcast: root_rank {root_rank} is not a rank (0..{size - 1})")
    return _submit(BroadcastOp(_name(name, "broadcast"), tensor, output, root_rank))


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set):
    """Start copying root_rank's `tensor` to every rank into a new tensor; returns a handle."""
    return _broadcast_async(tensor, torch.empty_like(tensor), root_rank, name, process_set)


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set):
    """Start overwriting `tensor` with root_rank's, in place; returns a handle."""
    return _broadcast_async(tensor, tensor, root_rank, name, process_set)


class HorovodBroadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name):
        ctx.root_rank = root_rank
        return synchronize(broadcast_async(tensor, root_rank, name))

    @staticmethod
    def backward(ctx, grad_output):
        reduced = allreduce(grad_output, op=Average)
        if runtime().rank != ctx.root_rank:
            reduced = reduced * 0
        return reduced, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """root_rank's `tensor` on every rank, as a new tensor; differentiable."""
    check_process_set(process_set)
    return HorovodBroadcast.apply(tensor, root_rank, name)


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    """Overwrite `tensor` with root_rank's, in place; returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


# -- reducescatter ---------------------------------------------------------------------------


def _reducescatter_async(tensors, name, op, process_set, prescale_factor, postscale_factor, kind):
    from .basics import HorovodInternalError

    check_process_set(process_set)
    for t in tensors:
        reduce_ops.check_tensor(t, kind)
        if t.dim() == 0:  # Horovod refuses it at the call (a ValueError), before any rank waits
            raise ValueError(f"{kind}: a 0-d tensor has no first dimension to scatter")
    if op not in (Average, Sum):  # Horovod: a RuntimeError at the call, as HorovodInternalError
        raise HorovodInternalError(f"{kind} supports op=hvd.Average and op=hvd.Sum only; got "
                                   f"{OP_NAMES.get(op, repr(op))}")
    return _submit(ReducescatterOp(_name(name, kind), list(tensors), op, prescale_factor,
                                   postscale_factor, single=kind == "reducescatter"))


def reducescatter_async(tensor, name=None, op=Average, process_set=global_process_set,
                        prescale_factor=1.0, postscale_factor=1.0):
    """Start reducing `tensor` over all ranks (op Average or Sum; same shape everywhere)
    and keeping this rank's share of dimension 0 (rows // size, one more on each of the
    first rows % size ranks); returns a handle. `tensor` is not modified."""
    return _reducescatter_async([tensor], name, op, process_set, prescale_factor,
                                postscale_factor, "reducescatter")


def _reducescatter_grad(grad, op, prescale_factor, postscale_factor):
    """Horovod's gradient scale before the allgather: size under Sum, 1 under Average, then
    both factors (so n times the exact gradient of the summed outputs, as Horovod defines
    it; applied one factor at a time, as Horovod rounds)."""
    for factor in (runtime().size if op == Sum else 1, prescale_factor, postscale_factor):
        if factor != 1:
            grad = grad * factor
    return grad


class HorovodReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, process_set, prescale_factor, postscale_factor):
        ctx.args = (op, prescale_factor, postscale_factor)
        return synchronize(reducescatter_async(tensor, name, op, process_set, prescale_factor,
                                               postscale_factor))

    @staticmethod
    def backward(ctx, grad_output):
        return allgather(_reducescatter_grad(grad_output, *ctx.args)), \
            None, None, None, None, None


def reducescatter(tensor, name=None, compression=Compression.none, op=Average,
                  process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0):
    """`tensor` reduced over all ranks (default: averaged), this rank's share of dimension
    0 as a new tensor (see reducescatter_async); differentiable (gradient: an allgather)."""
    check_process_set(process_set)
    compressed, ctx = compression.compress(tensor)
    reduced = HorovodReducescatter.apply(compressed, name, op, process_set, prescale_factor,
                                         postscale_factor)
    return compression.decompress(reduced, ctx)


def grouped_reducescatter_async(tensors, name=None, op=Average, process_set=global_process_set,
                                prescale_factor=1.0, postscale_factor=1.0):
    """Start reducescatters of a list of tensors as one fused operation; returns a handle."""
    return _reducescatter_async(tensors, name, op, process_set, prescale_factor,
                                postscale_factor, "grouped_reducescatter")


class HorovodGroupedReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, process_set, prescale_factor, postscale_factor, *tensors):
        ctx.args = (op, prescale_factor, postscale_factor)
        return tuple(synchronize(grouped_reducescatter_async(
            list(tensors), name, op, process_set, prescale_factor, postscale_factor)))

    @staticmethod
    def backward(ctx, *grad_output):
        grads = [_reducescatter_grad(g, *ctx.args) for g in grad_output]
        return (None, None, None, None, None, *grouped_allgather(grads))


def grouped_reducescatter(tensors, name=None, compression=Compression.none, op=Average,
                          process_set=global_process_set, prescale_factor=1.0,
                          postscale_factor=1.0):
    """reducescatter of each tensor of a list, as one fused operation; differentiable."""
    check_process_set(process_set)
    packed = [compression.compress(t) for t in tensors]
    reduced = HorovodGroupedReducescatter.apply(name, op, process_set, prescale_factor,
                                                postscale_factor, *[t for t, _ in packed])
    return [compression.decompress(t, ctx) for t, (_, ctx) in zip(reduced, packed)]


# -- handles and barriers ----------------------------------------------------------------------


def poll(handle) -> bool:
    """Has the operation of `handle` finished (synchronize() would not block)?"""
    return runtime().engine.poll(handle)


def synchronize(handle):
    """Wait for the operation of `handle`; its result (a tensor, or a list for grouped
    operations). HorovodInternalError if it failed (on every rank it failed on)."""
    return runtime().engine.wait(handle)


def barrier(process_set=global_process_set):
    """Wait until every rank has called barrier()."""
    check_process_set(process_set)
    synchronize(_submit(BarrierOp(_name(None, "barrier"))))


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    from .unsupported import not_supported
    not_supported("alltoall", instead="allgather and keep your part")


alltoall_async = alltoall


__all__ = [n for n in dir() if not n.startswith("_") and n not in (
    "annotations", "math", "warnings", "torch", "reduce_ops", "Operation", "AllreduceOp",
    "AllgatherOp", "BroadcastOp", "ReducescatterOp", "BarrierOp", "runtime", "check_process_set",
    "split_rows")]
__all__ += ["Min", "Max", "Product"]
