"""What one hvd.allreduce call costs, small (4 B, 4 KiB) and large (4 MiB) float32 tensors,
op Sum, out of place (a new tensor each call, as hvd.allreduce returns one):

  --api hpcaccel   in one process, alternating loop by loop (same moment, same load):
                   "mpi4py Allreduce"                 bare comm.Allreduce(src, dst)
                   "hpcaccel.torch"                   hvd.allreduce through hpcaccel.torch
                   "hpcaccel.torch, check skipped"    the same with the engine's agreement
                                                      check (agreement.Rounds.agree) patched
                                                      out here, to measure what it costs
                   "mpi4py Allreduce, check's 56 B"   a bare Allreduce of the check's own
                                                      message (24 + 24 + 8 bytes, bitwise or)
  --api horovod    real Horovod's hvd.allreduce (a process of its own: its background
                   thread keeps polling and would slow anything measured beside it)

Each loop: a barrier, then `calls` calls; its time per call is the slowest rank's. Rank 0
writes --out (JSON): every loop's time per call per implementation and size.
"""
import argparse
import json
import time

import numpy as np
import torch

SIZES = (4, 4 << 10, 4 << 20)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", choices=("hpcaccel", "horovod"), required=True)
    p.add_argument("--loops", type=int, default=7)
    p.add_argument("--small-calls", type=int, default=300, help="calls per loop, 4 B and 4 KiB")
    p.add_argument("--large-calls", type=int, default=20, help="calls per loop, 4 MiB")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)

    if args.api == "horovod":
        import horovod.torch as hvd
    else:
        import hpcaccel.torch as hvd
    hvd.init()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD

    def api_call(t):
        return lambda: hvd.allreduce(t, op=hvd.Sum)

    impls = {}
    if args.api == "hpcaccel":
        from hpcaccel.torch.agreement import Rounds
        checked = Rounds.agree

        def bare(t):
            src, dst = t.numpy(), np.empty(t.numel(), np.float32)
            return lambda: comm.Allreduce(src, dst, op=MPI.SUM)

        def unchecked(t):
            call = api_call(t)

            def run():
                Rounds.agree = lambda self, op: None
                try:
                    return call()
                finally:
                    Rounds.agree = checked
            return run

        def check_message(t):
            both = bytearray(56)
            return lambda: comm.Allreduce(MPI.IN_PLACE, [both, MPI.BYTE], op=MPI.BOR)

        impls = {"mpi4py Allreduce": bare, "hpcaccel.torch": api_call,
                 "hpcaccel.torch, check skipped": unchecked,
                 "mpi4py Allreduce, check's 56 B": check_message}
        barrier = comm.Barrier
    else:
        impls = {"Horovod": api_call}
        barrier = hvd.barrier

    times = {name: {n: [] for n in SIZES} for name in impls}
    for nbytes in SIZES:
        t = torch.ones(nbytes // 4)
        calls = args.small_calls if nbytes <= 4 << 10 else args.large_calls
        ops = {name: make(t) for name, make in impls.items()}
        for op in ops.values():  # warm-up: connections, buffers, the algorithm's set-up
            for _ in range(3):
                op()
        for _ in range(args.loops):
            for name, op in ops.items():  # alternating: a load change hits all alike
                barrier()
                t0 = time.perf_counter()
                for _ in range(calls):
                    op()
                times[name][nbytes].append((time.perf_counter() - t0) / calls)
    # the slowest rank's time of each loop
    gathered = comm.gather(times, root=0) if args.api == "hpcaccel" else hvd.allgather_object(times)
    if hvd.rank() == 0 and args.out:
        worst = {name: {str(n): [max(g[name][n][i] for g in gathered) for i in range(args.loops)]
                        for n in SIZES} for name in impls}
        with open(args.out, "w") as fh:
            json.dump({"seconds_per_call": worst, "size": hvd.size(), "loops": args.loops,
                       "calls": {"small": args.small_calls, "large": args.large_calls},
                       "torch": torch.__version__}, fh)
    hvd.shutdown()


if __name__ == "__main__":
    main()
