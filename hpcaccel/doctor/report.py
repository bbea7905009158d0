"""The doctor's run: gather facts on every rank, judge them on rank 0, print one report.

Cross-rank invariant: every rank runs `run` to the end and makes the same collective calls
in the same order whatever it finds (a failed check is a value, not an exception); the
verdicts are judged on rank 0 and their problem count broadcast, so all ranks exit alike.
"""
from __future__ import annotations

import os

from .. import env
from . import facts, probe
from .verdicts import (data_verdicts, horovod_verdicts, layout_verdicts, note, out_verdicts,
                       table, world_verdicts)


def run(args, comm, write=print) -> int:
    """Collective. Returns the number of problems (the same on every rank)."""
    world = env.detect(threads=args.threads, comm=comm, check_size=False)
    rows = comm.gather(facts.rank_row(world), root=0)
    level, serialized_ok = facts.thread_level()
    reasons = facts.horovod_reasons(comm)
    auto, why = facts.auto_backend(comm)
    data = facts.open_data(comm, args.data) if args.data else None
    refused = facts.out_refusal(comm, args.out, args.resume, args.overwrite) if args.out else None
    out = facts.shared_out(comm, args.out, world.node_name) if args.out else None
    links = probe.run(comm, world.local_rank, world.nodes)
    if comm.Get_rank() != 0:
        return comm.bcast(None, root=0)

    lines = [f"hpcaccel doctor: {world.size} rank(s) on {world.nodes} host(s)",
             f"MPI: {world.mpi_library}; thread level {level}",
             f"transports: {facts.transports(os.environ)}", "", table(rows), ""]
    verdicts = world_verdicts(world.size, env.expected_size(os.environ), level, serialized_ok)
    verdicts += layout_verdicts(rows, args.threads)
    horovod = horovod_verdicts(reasons)
    verdicts += horovod
    usable = "usable on every rank" if all(r is None for r in reasons) else "not usable"
    lines.append(f"horovod: {usable}; --backend auto picks {auto} ({why})")
    if args.data and data is None:
        from ..data.sources import cache_dir
        lines.append(f"data: {args.data}: a built-in source; training packs it on first use "
                     f"into {cache_dir()} (once per host)")
    elif data is not None:
        found = data_verdicts(args.data, data)
        verdicts += found
        lines.append(f"data: {args.data}: " + ("see problems below" if found else
                                                f"{data[0][1]} samples, seen alike by every rank"))
    if out is not None:
        flags = f"--resume {args.resume} --overwrite {str(args.overwrite).lower()}"
        found = out_verdicts(args.out, *out, refused=refused, flags=flags)
        verdicts += found
        lines.append(f"out: {args.out}: " + ("see problems below" if found else
                                              "rank 0 writes there and every host sees it"))
    lines += _probe_lines(links, args)
    if world.size == 1:
        verdicts.append(note("one rank: nothing to average, the allreduce probe was skipped"))
    problems = sum(v.severity == "problem" for v in verdicts)
    lines += [""] + [v.line() for v in verdicts]
    lines.append(f"doctor: {problems} problem(s), {len(verdicts) - problems} note(s): "
                 + ("fix the problems before launching" if problems else "ready to train"))
    write("\n".join(lines))
    return comm.bcast(problems, root=0)


def _probe_lines(links, args) -> list[str]:
    if not links:
        return []
    lines = ["allreduce probe (in-place float32 MPI_Allreduce, slowest rank, best of a few):"]
    lines += [f"  {link.line()}" for link in links]
    if args.grad_mb is not None:
        lines += probe.prediction(probe.model_link(links), probe.reduction_gamma(),
                                  args.grad_mb, args.compute_ms)
    return lines
