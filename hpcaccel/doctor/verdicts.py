"""The doctor's judgement: facts gathered from every rank in, verdicts out. Pure.

A verdict is a `problem` (the job would fail, hang, lose work or run far below its speed;
the doctor then exits 1) or a `note` (worth knowing, not wrong). Each names what to do.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ..wording import plural


@dataclass(frozen=True)
class RankRow:
    """What one rank reports about itself."""
    host: str
    rank: int
    local_rank: int
    cpus: frozenset          # its CPU affinity
    sockets: frozenset       # sockets those CPUs lie on
    numa: frozenset          # NUMA nodes those CPUs lie on
    host_sockets: int        # sockets on its host
    threads: int             # intra-op threads it would use


@dataclass(frozen=True)
class Verdict:
    severity: str  # "problem" or "note"
    text: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.severity.upper()}: {self.text}" + (f" -> {self.fix}" if self.fix else "")


def problem(text: str, fix: str) -> Verdict:
    return Verdict("problem", text, fix)


def note(text: str, fix: str = "") -> Verdict:
    return Verdict("note", text, fix)


def cpulist(cpus) -> str:
    """{0,1,2,5} -> "0-2,5"."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(_span(run))
            run = []
        run.append(c)
    if run:
        out.append(_span(run))
    return ",".join(out) or "-"


def _span(run) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def by_host(rows: list[RankRow]) -> dict[str, list[RankRow]]:
    hosts = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.rank):
        hosts[row.host].append(row)
    return dict(hosts)


def _ranks(rows) -> str:
    ranks = [r.rank for r in rows]
    return ",".join(map(str, ranks[:8])) + (",..." if len(ranks) > 8 else "")


def layout_verdicts(rows: list[RankRow], threads_flag: int | None) -> list[Verdict]:
    """Per host: threads against cores, ranks sharing cores, ranks spanning sockets."""
    out = []
    for host, ranks in by_host(rows).items():
        cores = frozenset().union(*(r.cpus for r in ranks))
        threads = sum(r.threads for r in ranks)
        if len(ranks) > len(cores):
            # mpirun and srun refuse this unless told to (--oversubscribe, --overcommit)
            out.append(note(f"{host}: {len(ranks)} ranks on {plural(len(cores), 'core')} "
                            f"time-share them",
                            "fine for testing, meaningless for speed: use at most one rank "
                            "per core (one per socket is usual)"))
        if threads > max(len(cores), len(ranks)):
            fair = max(1, len(cores) // len(ranks))
            how = (f"use --threads {fair} or leave --threads unset (hpcaccel then shares "
                   f"each rank's cores evenly)") if threads_flag else \
                  "bind ranks to disjoint cores (mpirun --bind-to core|socket, srun --cpu-bind)"
            out.append(problem(f"{host}: {plural(len(ranks), 'rank')} x threads = "
                               f"{plural(threads, 'thread')} on {plural(len(cores), 'core')} "
                               f"(oversubscribed)", how))
        out += _overlaps(host, ranks)
        if 1 < ranks[0].host_sockets == len(ranks):
            spanning = [r for r in ranks if len(r.sockets) > 1]
            if spanning:
                out.append(problem(
                    f"{host}: {len(ranks)} ranks on {len(ranks)} sockets but rank(s) "
                    f"{_ranks(spanning)} span several sockets (memory traffic crosses sockets)",
                    "bind one rank per socket: mpirun --map-by socket --bind-to socket, "
                    "or srun --cpu-bind=sockets"))
    return out


def _overlaps(host: str, ranks: list[RankRow]) -> list[Verdict]:
    """Ranks with the same CPU set split it evenly (env.threads_per_rank); ranks whose sets
    overlap only in part cannot, and compete on the shared cores."""
    sets = sorted({r.cpus for r in ranks}, key=sorted)
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            shared = a & b
            if shared:
                who = [r for r in ranks if r.cpus in (a, b)]
                return [problem(f"{host}: rank(s) {_ranks(who)} share cores {cpulist(shared)} "
                                f"with different bindings ({cpulist(a)} / {cpulist(b)})",
                                "bind ranks to disjoint cores (mpirun --bind-to core|socket, "
                                "srun --cpu-bind=cores|sockets)")]
    return []


def world_verdicts(mpi_size: int, expected: tuple[int, str] | None, thread_level: str,
                   serialized_ok: bool) -> list[Verdict]:
    """Launcher-vs-MPI world size and MPI's thread support."""
    out = []
    if expected is not None and expected[0] != mpi_size:
        n, who = expected
        out.append(problem(f"MPI reports {mpi_size} rank(s) but {who} started {n}: the ranks "
                           f"are not connected and would each train alone",
                           "under Slurm use `srun --mpi=pmix` (see `srun --mpi=list`), or "
                           "mpirun inside the allocation"))
    if not serialized_ok:
        out.append(problem(f"MPI provides thread level {thread_level}; the mpi reducer's "
                           f"communication thread needs MPI_THREAD_SERIALIZED or higher",
                           "use an MPI library built with thread support"))
    return out


def horovod_verdicts(reasons: list[str | None]) -> list[Verdict]:
    """`reasons[r]`: why Horovod is unusable on rank r (None: usable). Whether --backend
    horovod can run; what --backend auto picks is hpcaccel.comm.backend_choice.auto_backend's."""
    missing = [r for r, why in enumerate(reasons) if why is not None]
    if not missing:
        return []
    if len(missing) == len(reasons):
        return [note(f"Horovod not usable: {reasons[0]}; --backend horovod would fail",
                     "to use Horovod: bash scripts/horovod.sh .venv/bin/python")]
    return [problem(f"Horovod usable on some ranks only (not on rank(s) "
                    f"{','.join(map(str, missing[:8]))}: {reasons[missing[0]]})",
                    "install the same environment on every host")]


def data_verdicts(path: str, results: list[tuple[str | None, int | None]]) -> list[Verdict]:
    """`results[r]`: (error, samples) as rank r opened --data."""
    failed = [(r, err) for r, (err, _) in enumerate(results) if err is not None]
    if failed:
        if len(failed) == len(results):
            return [problem(f"{failed[0][1]} (on every rank)",
                            "give an HDF5 file with datasets x and y, or a shard index.json")]
        where = ",".join(str(r) for r, _ in failed[:8])
        return [problem(f"{failed[0][1]} (on rank(s) {where}; the others open it)",
                        f"put --data {path} on a filesystem every host mounts, readable by the job")]
    sizes = {n for _, n in results}
    if len(sizes) > 1:
        detail = ", ".join(f"rank {r}: {n}" for r, (_, n) in enumerate(results[:8]))
        return [problem(f"--data {path}: ranks see different sample counts ({detail})",
                        "ranks read different copies; point every host at the same files")]
    return []


def out_verdicts(path: str, write_error: str | None, unseen_hosts: list[str],
                 refused: str | None = None, flags: str = "") -> list[Verdict]:
    """rank 0 wrote a file into --out (or failed: write_error); hosts that did not see it;
    why hpcaccel.train `flags` (its --resume and --overwrite) would refuse --out at once
    (rundir.refusal), if it would: its own line says what to do."""
    if refused and not write_error:
        train = "hpcaccel.train" + (f" {flags}" if flags else "")
        return [problem(f"{train} would stop with exit 2: {refused}", "")]
    if write_error:
        return [problem(f"--out {path}: rank 0 cannot write there ({write_error})",
                        "choose a writable directory on shared storage")]
    if unseen_hosts:
        return [problem(f"--out {path}: host(s) {', '.join(unseen_hosts[:8])} do not see rank 0's "
                        f"file (not a shared filesystem; checkpoints written by rank 0 would be "
                        f"missing there and --resume breaks)",
                        "use a directory on a filesystem every host mounts (scratch, home)")]
    return []


def table(rows: list[RankRow]) -> str:
    head = ("host", "rank", "local", "cpus", "sockets", "numa", "threads")
    body = [(r.host, str(r.rank), str(r.local_rank), cpulist(r.cpus), cpulist(r.sockets),
             cpulist(r.numa), str(r.threads)) for r in sorted(rows, key=lambda r: r.rank)]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip()
                     for line in (head, *body))
