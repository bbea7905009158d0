"""Tensors as MPI buffers: which dtypes hpcaccel.torch accepts (Horovod's), and the MPI
reduction for each op and dtype. Pure mapping plus MPI op objects made once per process.

MPI has no 16-bit float types: float16 and bfloat16 travel as MPI 16-bit integers with
user-defined ops that combine them with torch (one rounding per addition, as Horovod's own
half-precision sum). bool reduces with logical ops (Sum and Max: or; Min and Product: and).
"""
from __future__ import annotations

import torch

from .basics import Max, Min, Product, Sum

SUPPORTED = frozenset((torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                       torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool))
HALF = (torch.float16, torch.bfloat16)
_ops = {}  # (dtype, op) -> MPI.Op
_MPI = None  # mpi4py.MPI, once a collective needs it (importing it initializes MPI)


def _mpi():
    global _MPI
    if _MPI is None:
        from mpi4py import MPI
        _MPI = MPI
    return _MPI


def IN_PLACE():  # noqa: N802 - MPI's name
    """MPI.IN_PLACE."""
    return _mpi().IN_PLACE
_TORCH_COMBINE = {Sum: torch.Tensor.add_, Product: torch.Tensor.mul_,
                  Min: lambda a, b: torch.minimum(a, b, out=a),
                  Max: lambda a, b: torch.maximum(a, b, out=a)}


def check_tensor(t: torch.Tensor, what: str) -> None:
    """Horovod's errors for tensors it cannot move."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED:
        raise ValueError(f"Tensor type {t.type()} is not supported.")
    if t.is_sparse:
        raise ValueError(f"{what}: sparse tensors are not supported; use tensor.to_dense()")


def as_array(host: torch.Tensor):
    """A contiguous CPU tensor as the 1-d array (or [array, MPI datatype]) MPI moves, zero
    copy: 16-bit floats as int16, bool as MPI's C bool."""
    flat = host.detach().view(-1)
    if host.dtype in HALF:
        return [flat.view(torch.int16).numpy(), _mpi().INT16_T]
    return flat.numpy()


def mpi_op(dtype: torch.dtype, op: int):
    """The MPI op that reduces `dtype` with Horovod op `op` (Sum, Min, Max, Product)."""
    found = _ops.get((dtype, op))
    if found is None:
        found = _ops[dtype, op] = _make_op(dtype, op)
    return found


def _make_op(dtype: torch.dtype, op: int):
    MPI = _mpi()
    if dtype == torch.bool:
        return MPI.LOR if op in (Sum, Max) else MPI.LAND
    if dtype in HALF:
        combine = _TORCH_COMBINE[op]

        def reduce(inbuf, inoutbuf, datatype, dtype=dtype, combine=combine):
            if len(inbuf):
                combine(torch.frombuffer(inoutbuf, dtype=dtype),
                        torch.frombuffer(inbuf, dtype=dtype))
        return MPI.Op.Create(reduce, commute=True)
    return {Sum: MPI.SUM, Min: MPI.MIN, Max: MPI.MAX, Product: MPI.PROD}[op]


def scale_(t: torch.Tensor, factor: float) -> None:
    """t *= factor in place; integer tensors are scaled in float64 and truncated."""
    if factor == 1.0:
        return
    if t.dtype.is_floating_point:
        t.mul_(factor)
    elif t.dtype == torch.bool:
        raise ValueError("prescale/postscale factors do not apply to bool tensors")
    else:
        t.copy_((t.double() * factor).trunc())
