"""The operations that move tensors (engine.py's Operation subclasses): what hvd.allreduce,
allgather, broadcast, reducescatter and barrier run once every rank agreed on them, in
whichever thread holds the engine.

Tensors on a GPU or not contiguous go through a contiguous host copy; a contiguous CPU
tensor is handed to MPI as it is (zero copy in place; out of place, one copy into the new
tensor, reduced or broadcast there).
"""
from __future__ import annotations

import math

import torch

from . import reduce_ops
from .basics import Adasum, Average, OP_NAMES, Sum, runtime
from .engine import Operation


def _host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with t's values: t itself when it already is one."""
    return t if t.device.type == "cpu" and t.is_contiguous() else t.detach().cpu().contiguous()


def _direct(t: torch.Tensor) -> bool:
    """MPI may read or write `t` itself: a contiguous CPU tensor."""
    return t.device.type == "cpu" and t.is_contiguous()


_META: dict = {}  # (dtype, shape) -> its text in fields()


def _meta(t: torch.Tensor, skip_first: bool = False) -> str:
    shape = t.shape[1:] if skip_first else t.shape
    key = (t.dtype, shape)
    text = _META.get(key)
    if text is None:
        if len(_META) >= 4096:
            _META.clear()
        text = _META[key] = f"{str(t.dtype).replace('torch.', '')}{list(shape)}"
    return text


def _scale(t: torch.Tensor, factor: float) -> None:
    if factor != 1.0:
        with torch.no_grad():
            reduce_ops.scale_(t, factor)


def _library_allreduce(algorithm, array) -> bool:
    """Whether `algorithm` reduces `array` in one MPI_Allreduce of the whole buffer (the
    library's own): the sliced one within one slice, the ring where it is latency-bound.
    Then the call goes to MPI directly, without the algorithm's own steps."""
    name = getattr(algorithm, "name", None)
    if name == "sliced":
        return array.nbytes <= algorithm.chunk_bytes
    if name == "ring":
        return len(array) < algorithm.size or array.nbytes < algorithm.small_bytes
    return False


class AllreduceOp(Operation):
    kind = "allreduce"

    def __init__(self, name, inputs, outputs, op, prescale, postscale, single,
                 auto_named=None):
        super().__init__(name, auto_named)
        self.inputs, self.outputs, self.single = inputs, outputs, single
        self.op, self.prescale, self.postscale = op, float(prescale), float(postscale)

    def fields(self):
        scales = [f"prescale {self.prescale:g}"] if self.prescale != 1 else []
        scales += [f"postscale {self.postscale:g}"] if self.postscale != 1 else []
        return [f"op {OP_NAMES[self.op]}", *scales] + [_meta(t) for t in self.inputs]

    def layout(self):
        return (type(self), self.op, self.prescale, self.postscale,
                *[(t.dtype, t.shape) for t in self.inputs])

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.inputs)

    def join_spec(self):
        """A joined rank reduces zeros of the same dtypes and shapes (join_ops.py)."""
        return self.joins_as("allreduce", [(str(t.dtype), tuple(t.shape)) for t in self.inputs],
                             self.op, self.prescale, self.postscale)

    def run(self, comm):
        size = comm.Get_size()
        if self.op == Average and any(t.dtype == torch.bool for t in self.inputs):
            raise ValueError("Average of bool tensors is undefined; use op=Sum or Max")
        op = Sum if self.op in (Average, Adasum) else self.op
        post = self.postscale / size if self.op == Average else self.postscale
        if len(self.inputs) == 1:
            self._one(comm, self.inputs[0], self.outputs[0], op, post)
            return self.outputs[0] if self.single else self.outputs
        # one fused buffer per dtype (a grouped allreduce is one operation, as in Horovod)
        by_dtype = {}
        for i, t in enumerate(self.inputs):
            by_dtype.setdefault(t.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            if len(idx) == 1:
                self._one(comm, self.inputs[idx[0]], self.outputs[idx[0]], op, post)
                continue
            buf = torch.cat([_host(self.inputs[i]).reshape(-1) for i in idx])
            _scale(buf, self.prescale)
            self._reduce(comm, buf, op)
            _scale(buf, post)
            offset = 0
            with torch.no_grad():
                for i in idx:
                    out = self.outputs[i]
                    out.copy_(buf[offset:offset + out.numel()].view(out.shape))
                    offset += out.numel()
        return self.outputs[0] if self.single else self.outputs

    def _one(self, comm, t, out, op, post) -> None:
        """Reduce one tensor `t` into `out` (t itself: in place). A new CPU tensor is
        reduced in place after one copy (measured faster than MPI's out-of-place allreduce
        at 4 MiB, and no slower at 4 KiB)."""
        if _direct(out):
            if out is not t:
                with torch.no_grad():
                    out.copy_(t)
            buf = out
        else:  # a GPU or non-contiguous output: through a host copy
            host = _host(t)
            buf = host.clone() if host is t else host
        _scale(buf, self.prescale)
        self._reduce(comm, buf, op)
        _scale(buf, post)
        if buf is not out:
            with torch.no_grad():
                out.copy_(buf.view(out.shape))

    @staticmethod
    def _reduce(comm, buf, op) -> None:
        """Reduce the contiguous CPU tensor `buf` in place over the ranks."""
        if not buf.numel():
            return
        array, mpi_op = reduce_ops.as_array(buf), reduce_ops.mpi_op(buf.dtype, op)
        algorithm = runtime().engine.algorithm()
        if _library_allreduce(algorithm, array[0] if isinstance(array, list) else array):
            comm.Allreduce(reduce_ops.IN_PLACE(), array, op=mpi_op)
        else:
            algorithm.allreduce_(array, mpi_op)


class AllgatherOp(Operation):
    kind = "allgather"

    def __init__(self, name, inputs, single, auto_named=None):
        super().__init__(name, auto_named)
        self.inputs, self.single = inputs, single

    def fields(self):
        return [_meta(t, skip_first=True) for t in self.inputs]

    def layout(self):
        return (type(self), *[(t.dtype, t.shape[1:]) for t in self.inputs])

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.inputs)

    def after_agree(self, comm):
        """Everything but the first dimensions matched; now the first dimensions every
        rank needs to place the rows (a fixed-size allgather: the tensor count agreed)."""
        import numpy as np

        mine = np.array([t.shape[0] if t.dim() else -1 for t in self.inputs], dtype=np.int64)
        every = np.empty((comm.Get_size(), len(mine)), dtype=np.int64)
        comm.Allgather(mine, every)
        self.rows = every.tolist()
        if (every == -1).any():
            return f"allgather {self.name!r}: tensors need at least one dimension"
        return None

    def run(self, comm):
        results = []
        for k, t in enumerate(self.inputs):
            host = _host(t)
            rows = [per_rank[k] for per_rank in self.rows]
            row_numel = math.prod(host.shape[1:])
            out = torch.empty((sum(rows), *host.shape[1:]), dtype=host.dtype)
            counts = [r * row_numel for r in rows]
            send, recv = reduce_ops.as_array(host), reduce_ops.as_array(out)
            if isinstance(send, list):
                comm.Allgatherv(send, [recv[0], counts, None, recv[1]])
            else:
                comm.Allgatherv(send, [recv, counts])
            results.append(out if t.device.type == "cpu" else out.to(t.device))
        return results[0] if self.single else results


class BroadcastOp(Operation):
    kind = "broadcast"

    def __init__(self, name, tensor, output, root, auto_named=None):
        super().__init__(name, auto_named)
        self.tensor, self.output, self.root = tensor, output, int(root)

    def fields(self):
        return [f"root {self.root}", _meta(self.tensor)]

    def layout(self):
        return (type(self), self.root, self.tensor.dtype, self.tensor.shape)

    def nbytes(self):
        return self.tensor.numel() * self.tensor.element_size()

    def run(self, comm):
        out = self.output
        if _direct(out):
            buf = out  # MPI writes the result in place (zero copy)
            if out is not self.tensor and comm.Get_rank() == self.root:
                with torch.no_grad():
                    out.copy_(self.tensor)  # only the root's values are sent
        else:
            host = _host(self.tensor)
            buf = host.clone() if host is self.tensor else host
        if buf.numel():
            comm.Bcast(reduce_ops.as_array(buf), root=self.root)
        if buf is not out:
            with torch.no_grad():
                out.copy_(buf.view(out.shape))
        return out


def split_rows(rows: int, size: int) -> list[int]:
    """Horovod's split of a first dimension over `size` ranks: rows // size each, and one
    more for each of the first rows % size ranks."""
    base, extra = divmod(rows, size)
    return [base + (r < extra) for r in range(size)]


class ReducescatterOp(Operation):
    """Sum over ranks, then rank r keeps its split_rows() share of the first dimension: one
    MPI_Reduce_scatter per dtype (a grouped call is fused, as Horovod fuses it)."""

    kind = "reducescatter"

    def __init__(self, name, inputs, op, prescale, postscale, single, auto_named=None):
        super().__init__(name, auto_named)
        self.inputs, self.single = inputs, single
        self.op, self.prescale, self.postscale = op, float(prescale), float(postscale)

    fields = AllreduceOp.fields  # op, factors, every dtype and whole shape must match
    layout = AllreduceOp.layout
    nbytes = AllreduceOp.nbytes

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

    def layout(self):
        return (type(self),)

    def nbytes(self):
        return 0

    def join_spec(self):
        return self.joins_as("barrier")

    def run(self, comm):
        return None  # agreeing on the barrier already waited for every rank
