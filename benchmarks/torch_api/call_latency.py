"""What one hpcaccel.torch call costs, this checkout beside another copy of hpcaccel, in one
process (same moment, same load): 4 KiB float32 allreduce, allreduce_async + synchronize,
broadcast and allgather, and a 4 MiB allreduce, with a bare mpi4py Allreduce of 4 KiB as
the floor.

  --against DIR   a directory holding another `hpcaccel` package, loaded beside this one
                  as `hpcaccel_base`, e.g. an earlier commit's:
                      git archive <commit> hpcaccel | tar -x -C /tmp/before
  (without it: this checkout only)

Both are initialized in the same processes (each with its own communicators and engine);
loops alternate between them, kind of call by kind of call. Each loop: a barrier, then
`calls` calls, each timed; a loop's time per call is the slowest rank's mean. Rank 0
prints, in microseconds, the median and the min over loops, and the median single call
(the slowest rank's): on a machine shared with other work a rank now and then waits a
whole scheduler time slice (milliseconds) for its peer, which a loop's mean includes and
the median call does not. Then the ratios (this checkout / the other) of the loop
medians and of the median calls. --out writes it all (JSON).
On such a machine the two also sway each other: a version that sleeps in every call (a
hand-off between threads) leaves its ranks less CPU time used, so the scheduler puts them
back sooner in the other's loops. Compare loop means on a quiet machine, or from jobs of
their own (allreduce_calls.py), and read the median call here.

  scripts/mpirun.sh 2 .venv/bin/python benchmarks/torch_api/call_latency.py --against /tmp/before
"""
import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np
import torch


def load_as(directory: str, name: str):
    """The `hpcaccel` package found in `directory`, imported under `name` (its imports are
    relative, so it keeps to its own modules)."""
    path = os.path.join(directory, "hpcaccel")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"), submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.torch")


def calls(hvd, small, large):
    return {
        "allreduce 4 KiB": lambda: hvd.allreduce(small, op=hvd.Sum),
        "allreduce_async+synchronize 4 KiB":
            lambda: hvd.synchronize(hvd.allreduce_async(small, op=hvd.Sum)),
        "broadcast 4 KiB": lambda: hvd.broadcast(small, 0),
        "allgather 4 KiB": lambda: hvd.allgather(small),
        "allreduce 4 MiB": lambda: hvd.allreduce(large, op=hvd.Sum),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default=None, help="directory holding another hpcaccel package")
    p.add_argument("--loops", type=int, default=9)
    p.add_argument("--small-calls", type=int, default=300, help="calls per loop, 4 KiB")
    p.add_argument("--large-calls", type=int, default=10, help="calls per loop, 4 MiB")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)

    import hpcaccel.torch as hvd
    versions = {"this checkout": hvd}
    if args.against:
        versions = {"against": load_as(args.against, "hpcaccel_base"), **versions}
    for v in versions.values():
        v.init()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD

    small, large = torch.ones(1024), torch.ones(1 << 20)
    src, dst = small.numpy(), np.empty(1024, np.float32)
    table = {"mpi4py Allreduce 4 KiB": {"mpi4py": lambda: comm.Allreduce(src, dst, op=MPI.SUM)}}
    for label, v in versions.items():
        for what, f in calls(v, small, large).items():
            table.setdefault(what, {})[label] = f
    times = {what: {label: [] for label in impls} for what, impls in table.items()}
    single = {what: {label: [] for label in impls} for what, impls in table.items()}
    clock = time.perf_counter
    for what, impls in table.items():
        n = args.large_calls if "MiB" in what else args.small_calls
        for f in impls.values():  # warm-up: connections, buffers, the algorithm's set-up
            for _ in range(5):
                f()
        for _ in range(args.loops):
            for label, f in impls.items():
                calls_ = single[what][label]
                comm.Barrier()
                t0 = clock()
                for _ in range(n):
                    t1 = clock()
                    f()
                    calls_.append(clock() - t1)
                times[what][label].append((clock() - t0) / n)
    medians = {what: {label: statistics.median(c) for label, c in per.items()}
               for what, per in single.items()}
    gathered = comm.gather((times, medians), root=0)
    if comm.Get_rank() == 0:
        worst = {what: {label: [max(g[what][label][i] for g, _ in gathered)
                                for i in range(args.loops)] for label in impls}
                 for what, impls in table.items()}
        call = {what: {label: max(m[what][label] for _, m in gathered) for label in impls}
                for what, impls in table.items()}
        print(f"{comm.Get_size()} ranks, {args.loops} loops; us per call: loops' median "
              f"(min) | median call")
        for what, per in worst.items():
            cells = [f"{label}: {statistics.median(t) * 1e6:8.1f} ({min(t) * 1e6:.1f}) | "
                     f"{call[what][label] * 1e6:.1f}" for label, t in per.items()]
            ratio = ""
            if len(per) == 2:
                a, b = (statistics.median(t) for t in per.values())
                ca, cb = call[what].values()
                ratio = f"   {b / a:.3f}x | {cb / ca:.3f}x"
            print(f"{what:34s} " + "   ".join(cells) + ratio)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"seconds_per_call": worst, "median_call": call,
                           "size": comm.Get_size(), "loops": args.loops,
                           "torch": torch.__version__}, fh)
    for v in versions.values():
        v.shutdown()


if __name__ == "__main__":
    main()
