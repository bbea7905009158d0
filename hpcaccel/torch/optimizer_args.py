"""hvd.DistributedOptimizer's arguments checked and translated for the reducer
(optimizer.py): compression to the reducer's wire, op, named parameters, parameter groups,
HOROVOD_FUSION_THRESHOLD. Local: each error is raised where it is found (the cross-rank check
of the layout is optimizer.py's)."""
from __future__ import annotations

import os

import torch

from .basics import Adasum, Average, OP_NAMES, Sum
from .compression import BF16Compressor, FP16Compressor, NoneCompressor, PowerSGDCompressor

_WIRE = ((NoneCompressor, "none"), (FP16Compressor, "fp16"), (BF16Compressor, "bf16"))


def _reducer_compression(compression) -> tuple[str, dict]:
    """The reducer's compression name and options for a Compression choice (the class or an
    instance of it). Only hpcaccel's own compressors: the reducer compresses whole buckets
    (16-bit wire, PowerSGD across steps), which a compressor of any other kind, written for
    one tensor at a time, cannot be turned into."""
    if compression is PowerSGDCompressor:
        compression = PowerSGDCompressor()  # the class itself: its default rank and start
    if type(compression) is PowerSGDCompressor:
        return "powersgd", {"powersgd_rank": compression.rank,
                            "powersgd_start_step": compression.start_step}
    for cls, wire in _WIRE:
        if compression is cls or type(compression) is cls:
            return wire, {}
    raise ValueError(
        f"DistributedOptimizer(compression={compression!r}): hpcaccel reduces gradients in "
        f"buckets and supports hvd.Compression.none, fp16, bf16 and powersgd(rank) there; a "
        f"compressor of your own works per tensor with hvd.allreduce(tensor, compression=...)")


def _check_op(op, size: int) -> str:
    """The reducer's op for Horovod's op (an int), or the error saying why not."""
    if op not in OP_NAMES:
        raise ValueError(f"op must be one of hvd.Average, Sum, Adasum, Min, Max, Product; "
                         f"got {op!r}")
    from .unsupported import not_supported
    if op == Adasum:
        if size > 1:
            not_supported("op=hvd.Adasum in DistributedOptimizer at more than one rank",
                          instead="op=hvd.Average")
        return "average"  # one rank: nothing to combine, the gradients stay as they are
    if op not in (Average, Sum):
        not_supported(f"op=hvd.{OP_NAMES[op]} in DistributedOptimizer (the reducer sums "
                      f"gradients)", instead="op=hvd.Average or hvd.Sum (hvd.allreduce "
                      f"reduces tensors with Min, Max and Product)")
    return "average" if op == Average else "sum"


def _named(optimizer, named_parameters) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) pairs with Horovod's checks: tuples, unique names, and every
    parameter of the optimizer named; unnamed optimizers get generated names."""
    if named_parameters is not None:
        named = list(named_parameters)
    else:
        named = [(f"allreduce.noname.{i}.{j}", p) for i, group in enumerate(optimizer.param_groups)
                 for j, p in enumerate(group["params"])]
    if any(not isinstance(item, tuple) for item in named):
        raise ValueError("named_parameters must be a sequence of (name, parameter) tuples, "
                         "as model.named_parameters() gives")
    seen, dups = set(), set()
    for name, _ in named:
        (dups if name in seen else seen).add(name)
    if dups:
        raise ValueError(f"Parameter names in named_parameters must be unique; these appear "
                         f"more than once: {', '.join(sorted(map(str, dups)))}")
    named_ids = {id(p) for _, p in named}
    unnamed = [p for group in optimizer.param_groups for p in group["params"]
               if id(p) not in named_ids]
    if unnamed:
        raise ValueError(f"named_parameters was given but does not name {len(unnamed)} of "
                         f"the optimizer's parameters (Python object ids: "
                         f"{', '.join(str(id(p)) for p in unnamed)})")
    return named


def _check_groups(groups) -> None:
    """Horovod's checks of `groups`: a positive int, or lists of tensors, each at most once."""
    if groups is None:
        return
    if not isinstance(groups, list):
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ValueError("groups must be a positive integer or a list of lists of "
                             "torch.Tensor")
        return
    seen = set()
    for group in groups:
        for p in group:
            if not isinstance(p, torch.Tensor):
                raise ValueError("groups must consist of torch.Tensor")
            if id(p) in seen:
                raise ValueError("A parameter can only appear once in groups")
            seen.add(id(p))


def _bucket_bytes() -> int | None:
    """The bucket size: Horovod's fusion threshold (HOROVOD_FUSION_THRESHOLD, bytes: the
    most gradient data reduced in one operation) where the job sets it; else None, the
    reducer's choice (25 MiB on one host, from the measured link across hosts)."""
    value = os.environ.get("HOROVOD_FUSION_THRESHOLD")
    if value is None or value.strip() == "":
        return None
    try:
        nbytes = int(value)
    except ValueError:
        raise ValueError(f"HOROVOD_FUSION_THRESHOLD={value!r}: expected a number of "
                         f"bytes") from None
    if nbytes < 0:
        raise ValueError(f"HOROVOD_FUSION_THRESHOLD={value!r}: must not be negative")
    return nbytes
