"""Who this process is in the job a script started with `hvd.init()`: the communicator,
ranks and sizes, and what this build offers (Horovod's basics, same names and values).

One Runtime per process, made by init() and torn down by shutdown(). Everything in
hpcaccel.torch reaches MPI through it: its collective engine (engine.py) for tensors, its
control plane for small values and objects (control_ops.py: on the engine too), and the
Reducer a DistributedOptimizer builds on its communicator (each step agreed on the engine,
exchange.py).

Leaving is an event (hpcaccel/departure.py): a rank whose script returns or calls
sys.exit, that calls shutdown(), or that an uncaught exception ends tells the other ranks
before MPI is finalized, and their pending and next collectives fail naming it.
"""
from __future__ import annotations

import atexit
import threading
import weakref

from .errors import HorovodInternalError, HostsUpdatedInterrupt, not_initialized  # noqa: F401
from .process_sets import attach as _attach_process_set, only_global

# Horovod's reduction ops, with Horovod's values (scripts compare and pass them as ints).
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
OP_NAMES = {Average: "Average", Sum: "Sum", Adasum: "Adasum", Min: "Min", Max: "Max",
            Product: "Product"}


class Runtime:
    """The job as hvd.init() found it. Collective to build (splits communicators)."""

    def __init__(self, comm):
        from mpi4py import MPI

        from ..comm.hierarchical import node_layout

        self.MPI = MPI
        self.comm = comm  # the script's world: every rank of it calls every collective
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        local, self.hosts, per_host = node_layout(comm)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.homogeneous = per_host is not None
        cross = comm.Split(color=self.local_rank, key=self.rank)
        self.cross_rank, self.cross_size = cross.Get_rank(), cross.Get_size()
        cross.Free()
        from .control_ops import EngineControlPlane
        from .engine import Engine
        self.engine = Engine(comm.Dup())
        # small values and objects (Job's votes and gathers, the optimizer's votes): on the
        # engine too, agreed in order with the tensor collectives (control_ops.py)
        self.control = EngineControlPlane(comm.Dup(), self.engine)
        self.timeline = None
        self._reducers = []  # DistributedOptimizers' reducers, by creation order (weakly)
        from .. import departure
        from ..collectives import TRACKER
        self.departures = departure.Departures(
            comm, counts=lambda: {**TRACKER.seq, "rounds": self.engine.rounds.count})
        departure.install(self.departures)

    def add_reducer(self, reducer) -> int:
        """Local. Remember a DistributedOptimizer's reducer; its number (creation order,
        the same on every rank) by which a joined rank finds it (join_ops.py)."""
        self._reducers.append(weakref.ref(reducer))
        return len(self._reducers) - 1

    def reducer(self, index: int):
        found = self._reducers[index]()
        if found is None:
            raise RuntimeError(f"DistributedOptimizer #{index} is gone on this rank, but the "
                               f"other ranks still step it")
        return found

    def close(self, reason: int = 1):
        """Finish what was submitted, tell the other ranks this one leaves (`reason`, an
        index of departure.REASONS), free the communicators. Local."""
        from .. import departure

        self.engine.close()
        self.departures.announce(reason)
        if departure.current() is self.departures:
            departure.install(None)
        if self.timeline is not None:
            self.timeline.close()
            self.timeline = None
        self.control.comm.Free()
        self.comm.Free()


_runtime: Runtime | None = None
_lock = threading.Lock()


def _world(comm):
    """The communicator init(comm) asks for, as a duplicate this module owns."""
    from mpi4py import MPI

    if comm is None:
        return MPI.COMM_WORLD.Dup()
    if isinstance(comm, MPI.Comm):
        if comm == MPI.COMM_NULL:
            raise ValueError("init(comm=...): MPI.COMM_NULL is no communicator; pass the "
                             "communicator of the ranks taking part, or a list of their ranks")
        return comm.Dup()
    ranks = [int(r) for r in comm]
    world = MPI.COMM_WORLD
    bad = [r for r in ranks if not 0 <= r < world.Get_size()]
    if bad or len(set(ranks)) != len(ranks) or not ranks:
        raise ValueError(f"init(comm={ranks!r}): ranks must be distinct and in "
                         f"0..{world.Get_size() - 1} of MPI.COMM_WORLD")
    # Collective over COMM_WORLD: every process of the job calls init with the same list.
    sub = world.Create(world.Get_group().Incl(ranks))
    if sub == MPI.COMM_NULL:
        raise ValueError(f"init(comm={ranks!r}): this process (rank {world.Get_rank()} of "
                         f"MPI.COMM_WORLD) is not in the list; only the listed ranks may "
                         f"call hpcaccel.torch")
    return sub


def init(comm=None, process_sets=None):
    """Start hpcaccel.torch in this process. Collective over `comm` (default: every MPI
    rank); idempotent: a second call while initialized does nothing.

    comm: None (MPI.COMM_WORLD), an mpi4py communicator, or a list of COMM_WORLD ranks.
    process_sets: only None (or the global set) is supported.
    """
    global _runtime
    if process_sets not in (None, [], ()) and not only_global(process_sets):
        from .unsupported import not_supported
        not_supported("process sets other than the global one")
    with _lock:
        if _runtime is not None:
            return
        _runtime = Runtime(_world(comm))
        _attach_process_set(_runtime.rank, _runtime.size)
        if _runtime.size > 1:
            _end_job_on_uncaught_exception()
        global _exit_registered
        if not _exit_registered:
            _exit_registered = True
            atexit.register(_at_exit)


_exit_registered = False


def _at_exit() -> None:
    """The script ended (returned, sys.exit) without shutdown(): shut down, telling the
    other ranks, before mpi4py finalizes MPI (a later exit handler: atexit runs first)."""
    from mpi4py import MPI

    if _runtime is not None and not MPI.Is_finalized():
        _shutdown(reason=0)


def _end_job_on_uncaught_exception() -> None:
    """An exception that ends this rank's script ends every rank (MPI_Abort after the
    traceback), instead of leaving the others waiting in their next collective forever:
    under srun or a launcher that does not kill a job when one process fails too."""
    import sys

    previous = sys.excepthook
    if getattr(previous, "__hpcaccel__", False):
        return

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.write(f"hpcaccel.torch: rank {_runtime.rank if _runtime else '?'} failed "
                         f"({kind.__name__}); ending every rank of the job\n")
        sys.stderr.flush()
        from ..runlock import release_held
        release_held()  # a Job's run.lock: the next start need not wait for it to go stale
        if _runtime is not None:  # peers fail naming this rank, should the abort not end them
            _runtime.departures.announce(3)
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(1)
    hook.__hpcaccel__ = True
    sys.excepthook = hook


def shutdown():
    """Stop hpcaccel.torch in this process (pending operations are finished first). The
    other ranks' collectives that this rank never enters fail, naming it (as Horovod's
    "Horovod has been shut down"). init() may be called again afterwards."""
    _shutdown(reason=1)


def _shutdown(reason: int) -> None:
    global _runtime
    with _lock:
        if _runtime is not None:
            _attach_process_set(None)
            _runtime.close(reason)
            _runtime = None


def runtime() -> Runtime:
    """The live Runtime; ValueError (Horovod's) before init()."""
    if _runtime is None:
        raise not_initialized()
    return _runtime


def is_initialized() -> bool:
    return _runtime is not None


def size() -> int:
    return runtime().size


def rank() -> int:
    return runtime().rank


def local_size() -> int:
    return runtime().local_size


def local_rank() -> int:
    return runtime().local_rank


def cross_size() -> int:
    return runtime().cross_size


def cross_rank() -> int:
    return runtime().cross_rank


def is_homogeneous() -> bool:
    """Every host runs the same number of ranks."""
    return runtime().homogeneous


def mpi_threads_supported() -> bool:
    """MPI allows calls from several threads at once (hpcaccel.torch needs it: collectives
    run in a background thread)."""
    from mpi4py import MPI
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


# What this build offers, answered honestly: everything runs over MPI (mpi4py), nothing
# over Gloo, NCCL, DDL, oneCCL or ROCm. CUDA tensors are supported through host copies.
def mpi_built() -> bool:
    return True


def mpi_enabled() -> bool:
    return True


def gloo_built() -> bool:
    return False


def gloo_enabled() -> bool:
    return False


def nccl_built() -> int:
    return 0


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    return False


def rocm_built() -> bool:
    return False


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Record this job's collectives as a Chrome trace (open in ui.perfetto.dev).
    Collective. mark_cycles is accepted and ignored (there is no background cycle)."""
    from ..timeline import Timeline

    rt = runtime()
    if rt.timeline is not None:
        rt.timeline.close()
    rt.timeline = Timeline(file_path, rt.control).start()
    rt.engine.timeline = rt.timeline


def stop_timeline() -> None:
    """Stop recording and write the trace. Collective."""
    rt = runtime()
    if rt.timeline is not None:
        rt.engine.timeline = None
        rt.timeline.close()
        rt.timeline = None
