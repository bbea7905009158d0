"""hpcaccel.torch's error types (Horovod's horovod.common.exceptions names), imported by
every module that raises them; hpcaccel.torch and its basics module export them too."""
from __future__ import annotations


class HorovodInternalError(RuntimeError):
    """A collective failed (ranks disagreed about it, or MPI failed); raised on every rank
    that takes part in it, as Horovod raises it."""


class HostsUpdatedInterrupt(RuntimeError):
    """Horovod's elastic interrupt; never raised here (elastic is not supported)."""

    def __init__(self, skip_sync=False):
        super().__init__("hosts updated")
        self.skip_sync = skip_sync


def not_initialized() -> ValueError:
    """Horovod's error for a call that needs hvd.init() first."""
    return ValueError("hpcaccel.torch has not been initialized; use hvd.init().")
