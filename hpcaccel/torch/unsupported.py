"""Horovod names hpcaccel.torch does not provide: each raises one NotImplementedError that
says what to use instead (docs/scripts.md lists them)."""
from __future__ import annotations


def not_supported(what: str, instead: str | None = None):
    hint = f"; use {instead} instead" if instead else ""
    raise NotImplementedError(f"hpcaccel.torch does not support {what}{hint} "
                              f"(docs/scripts.md lists what is supported)")


class SyncBatchNorm:
    """Not supported: raises when constructed."""

    def __init__(self, *args, **kwargs):
        not_supported("SyncBatchNorm", instead="torch.nn.BatchNorm* (statistics per rank), or "
                      "torch.nn.SyncBatchNorm under torch.distributed")


class _Elastic:
    """Stands in for horovod.torch.elastic: any attribute raises."""

    def __getattr__(self, name):
        not_supported(f"elastic ({'elastic.' + name})", instead="hpcaccel's checkpoints and "
                      "`--resume auto` with the Slurm templates' requeue (docs/slurm.md)")


elastic = _Elastic()
