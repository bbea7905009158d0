"""Who am I: rank, world size, local rank/size, nodes, threads per rank.

The one place hpcaccel asks the launcher and MPI about the job. Everything else receives a
`World` and never reads MPI or launcher environment variables itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UsageError

# Launcher variables that state the world size the launcher intended. If MPI reports a
# different size, ranks were started as singletons (srun without PMIx, say) and each would
# silently train alone.
_LAUNCHER_SIZE_VARS = (
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("PMI_SIZE", "a PMI launcher"),
    ("PMIX_SIZE", "a PMIx launcher"),
)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    nodes: int
    node_name: str
    threads: int
    mpi_library: str
    # every node's name, in the order of each node's lowest rank (rank 0's node first)
    hosts: tuple[str, ...] = ()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expected_size(environ) -> tuple[int, str] | None:
    """The world size the launcher intended, and who said so; None when unknown.

    Inside a Slurm job step started by srun, SLURM_STEP_NUM_TASKS is the step's task count.
    Under mpirun inside an allocation the ranks carry mpirun's own variables instead
    (and SLURM_PROCID is 0 everywhere), so mpirun's variables take precedence.
    """
    for var, who in _LAUNCHER_SIZE_VARS:
        if environ.get(var, "").isdigit():
            return int(environ[var]), f"{who} ({var})"
    if environ.get("SLURM_STEP_NUM_TASKS", "").isdigit() and "SLURM_STEP_ID" in environ:
        return int(environ["SLURM_STEP_NUM_TASKS"]), "srun (SLURM_STEP_NUM_TASKS)"
    return None


def check_world_size(mpi_size: int, environ) -> None:
    """Fail with one line when MPI's world is not the one the launcher started."""
    expected = expected_size(environ)
    if expected is not None and expected[0] != mpi_size:
        n, who = expected
        raise UsageError(
            f"MPI reports {mpi_size} rank(s) but {who} started {n}: the ranks are not "
            f"connected (under Slurm use `srun --mpi=pmix`, or mpirun inside the allocation)"
        )


def threads_per_rank(my_cpus: frozenset, local_cpus: list[frozenset]) -> int:
    """Threads this rank should use, from CPU affinity.

    A rank bound to a socket (`--bind-to socket`) owns that socket's cores. Ranks that share
    the same CPU set (unbound ranks all see every CPU) split it evenly, so a node is never
    oversubscribed by intra-op threads.
    """
    sharing = sum(1 for cpus in local_cpus if cpus == my_cpus)
    return max(1, len(my_cpus) // max(1, sharing))


def describe_hosts(hosts, limit: int = 4) -> str:
    """The node names for a start-up line: all of a few, the first `limit` of many. Pure."""
    hosts = list(hosts)
    shown = ", ".join(hosts[:limit])
    return shown + (f" and {len(hosts) - limit} more" if len(hosts) > limit else "")


def _affinity() -> frozenset:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def cpu_affinity() -> frozenset:
    """Local. The CPUs this process may run on: its binding, or every CPU when unbound."""
    return _affinity()


def parse_cpulist(text: str) -> frozenset:
    """Linux's CPU list format ("0-3,8,10-11") as a set of CPU numbers. Pure."""
    cpus = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(cpus)


def cpu_topology(sysfs: str = "/sys/devices/system") -> dict[int, tuple[int, int]]:
    """Local. Each CPU's (socket, NUMA node) from sysfs; CPUs whose files are missing get
    socket 0 / node 0 (containers and non-Linux systems then look like one socket)."""
    def read(path, default):
        try:
            with open(path) as fh:
                return fh.read().strip()
        except OSError:
            return default

    online = parse_cpulist(read(f"{sysfs}/cpu/online", f"0-{(os.cpu_count() or 1) - 1}"))
    node_of = {}
    for entry in (os.listdir(f"{sysfs}/node") if os.path.isdir(f"{sysfs}/node") else []):
        if entry.startswith("node") and entry[4:].isdigit():
            for cpu in parse_cpulist(read(f"{sysfs}/node/{entry}/cpulist", "")):
                node_of[cpu] = int(entry[4:])
    return {cpu: (int(read(f"{sysfs}/cpu/cpu{cpu}/topology/physical_package_id", "0")),
                  node_of.get(cpu, 0)) for cpu in sorted(online)}


def detect(threads: int | None = None, comm=None, check_size: bool = True) -> World:
    """Detect the world from MPI (initialising it) and pin torch's thread count.

    Collective: every rank of `comm` must call it. check_size False: report rather than
    refuse a world smaller than the launcher's (the doctor does).
    """
    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    if check_size:
        check_world_size(comm.Get_size(), os.environ)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        my_cpus = _affinity()
        local_cpus = local.allgather(my_cpus)
        # One name per node, from its lowest rank (the local leader): the node count and
        # the host list come from the same collective, so every rank sees the same ones.
        name = MPI.Get_processor_name()
        hosts = tuple(h for h in comm.allgather(name if local.Get_rank() == 0 else None) if h)
        world = World(
            rank=comm.Get_rank(),
            size=comm.Get_size(),
            local_rank=local.Get_rank(),
            local_size=local.Get_size(),
            nodes=len(hosts),
            node_name=name,
            threads=threads or threads_per_rank(my_cpus, local_cpus),
            mpi_library=MPI.Get_library_version().splitlines()[0].split(",")[0].strip(),
            hosts=hosts,
        )
    finally:
        local.Free()
    set_threads(world.threads)
    return world


def set_threads(n: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        # Inter-op parallelism only competes with intra-op threads and other ranks here.
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set by an earlier parallel op; harmless
