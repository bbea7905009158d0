"""What the doctor gathers from every rank. Identity (rank, host, threads) comes from
env.detect; this module adds the affinity and topology, Horovod, --data and --out.

Cross-rank invariants: every function marked collective is called by every rank, in the
same order; a rank's local failure (a file it cannot open) becomes a value it reports,
never an exception that would leave its peers waiting in the next collective.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import time

from .. import env
from .verdicts import RankRow

# Variables that select MPI's transports, by MPI family (read for the report only).
TRANSPORT_VARS = ("OMPI_MCA_pml", "OMPI_MCA_btl", "OMPI_MCA_mtl", "UCX_TLS", "UCX_NET_DEVICES",
                  "FI_PROVIDER", "I_MPI_FABRICS", "MPICH_OFI_NIC_POLICY")
THREAD_LEVELS = ("SINGLE", "FUNNELED", "SERIALIZED", "MULTIPLE")


def rank_row(world) -> RankRow:
    """Local. This rank's line of the table."""
    cpus = env.cpu_affinity()
    topology = env.cpu_topology()
    where = [topology.get(c, (0, 0)) for c in cpus]
    return RankRow(host=world.node_name, rank=world.rank, local_rank=world.local_rank,
                   cpus=cpus, sockets=frozenset(s for s, _ in where),
                   numa=frozenset(n for _, n in where),
                   host_sockets=len({s for s, _ in topology.values()}) or 1,
                   threads=world.threads)


def transports(environ) -> str:
    """Pure. The transport selection the environment asks for, or MPI's own choice."""
    chosen = [f"{var}={environ[var]}" for var in TRANSPORT_VARS if environ.get(var)]
    return ", ".join(chosen) or "MPI's default choice (no selection in the environment)"


def thread_level() -> tuple[str, bool]:
    """Local. MPI's provided thread level, and whether it is at least SERIALIZED."""
    from mpi4py import MPI

    level = MPI.Query_thread()
    names = {getattr(MPI, f"THREAD_{n}"): n for n in THREAD_LEVELS}
    return names.get(level, str(level)), level >= MPI.THREAD_SERIALIZED


def horovod_reasons(comm) -> list[str | None]:
    """Collective. Why Horovod is unusable, per rank (None: usable there)."""
    from ..comm import horovod_unavailable

    return comm.allgather(horovod_unavailable())


def auto_backend(comm) -> tuple[str, str]:
    """Collective. What `--backend auto` picks on these ranks (with --device auto), and why:
    the rule training uses (hpcaccel.comm.backend_choice)."""
    from ..comm.backend_choice import gather_auto

    return gather_auto(comm, "auto")


def open_data(comm, path: str) -> list[tuple[str | None, int | None]] | None:
    """Collective. (error, samples) per rank as each rank opens --data itself; None for a
    built-in source (digits, synthetic), which training packs on first use."""
    from ..data import BUILTINS, open_dataset
    from ..errors import UsageError

    if path in BUILTINS:  # the same answer on every rank, no file to open
        return None
    try:
        result = (None, open_dataset(path, "--data").samples)
    except UsageError as e:  # names the file already
        result = (str(e), None)
    except Exception as e:  # noqa: BLE001 - reported, judged on rank 0
        result = (f"--data {path}: {type(e).__name__}: {e}", None)
    return comm.allgather(result)


def out_refusal(comm, path: str, resume: str, overwrite: bool) -> str | None:
    """Collective. Why hpcaccel.train would refuse --out at once (rundir.refusal: the lock
    and the ownership rules training applies), judged on rank 0 (which writes the outputs);
    None elsewhere and where it would start."""
    from ..rundir import refusal

    return refusal(path, resume, overwrite) if comm.Get_rank() == 0 else None


def shared_out(comm, path: str, host: str, wait_s: float = 3.0) -> tuple[str | None, list[str]]:
    """Collective. Rank 0 writes a uniquely named file into --out; every rank looks for it.
    Returns (rank 0's write error or None, hosts that did not see it). Nothing already in
    --out is touched: the file and any directories created for it are removed again."""
    name = f".hpcaccel-doctor-{secrets.token_hex(6)}"
    probe_file = os.path.join(path, name)
    created, error = [], None
    if comm.Get_rank() == 0:
        try:
            created = _makedirs(path)
            with open(probe_file, "w") as fh:
                fh.write(name)
        except OSError as e:
            error = f"{type(e).__name__}: {e.strerror or e}"
    error, name = comm.bcast((error, name), root=0)  # rank 0's name is the one written
    probe_file = os.path.join(path, name)
    seen = error is None and _sees(probe_file, name, wait_s)
    hosts = comm.gather((host, seen), root=0)
    comm.Barrier()  # everyone has looked before rank 0 cleans up
    if comm.Get_rank() != 0:
        return error, []
    with contextlib.suppress(OSError):
        os.unlink(probe_file)
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    if error:
        return error, []
    return None, sorted({h for h, ok in hosts if not ok})


def _makedirs(path: str) -> list[str]:
    """mkdir -p, returning the directories it created (outermost first)."""
    missing, p = [], os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    missing.reverse()
    for directory in missing:
        os.mkdir(directory)
    return missing


def _sees(path: str, content: str, wait_s: float) -> bool:
    """Local. Whether the file appears with its content within wait_s (NFS may lag a
    little behind the writer's close)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path) as fh:
                if fh.read() == content:
                    return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
