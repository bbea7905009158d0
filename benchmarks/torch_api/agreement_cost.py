"""What the checks for ranks out of step cost per step (docs/reliability.md):

  step, exchange agreed       a DistributedOptimizer step (zero_grad, forward, backward,
                              step) of an MLP with `--hidden` units, as it runs
  step, not agreed            the same with the exchange's agreement switched off here
                              (reducer.exchange = None), as before it existed
  vote, script                Job's per-step vote: the script's control plane (the engine)
  vote, training command      ControlPlane.allreduce: MPI_Iallreduce, polled for departures
  vote, blocking Allreduce    a bare blocking MPI_Allreduce of the same 8 bytes (the vote
                              before the departure checks)

Alternating loop by loop (same moment, same load); each loop `--calls` calls after a
barrier; its time per call is the slowest rank's. Rank 0 prints the median, min and max.

  scripts/mpirun.sh 2 python benchmarks/torch_api/agreement_cost.py --hidden 64
"""
import argparse
import time

import numpy as np
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=64, help="MLP width (64: 5k parameters)")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--loops", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(1)

    import hpcaccel.torch as hvd
    from hpcaccel.control import ControlPlane
    from hpcaccel.torch.basics import runtime
    from mpi4py import MPI

    hvd.init()
    comm = MPI.COMM_WORLD
    plain = ControlPlane(comm.Dup())
    h = args.hidden
    model = torch.nn.Sequential(torch.nn.Linear(64, h), torch.nn.ReLU(), torch.nn.Linear(h, h),
                                torch.nn.ReLU(), torch.nn.Linear(h, 10))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                   named_parameters=model.named_parameters())
    reducer = opt._hvd_reducer
    agreed = reducer.exchange
    x = torch.randn(32, 64)

    def step(agreement):
        def run():
            reducer.exchange = agreement
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        return run

    one = np.zeros(1)
    impls = {"step, exchange agreed": step(agreed), "step, not agreed": step(None),
             "vote, script": lambda: runtime().control.allreduce([0.0], "max"),
             "vote, training command": lambda: plain.allreduce([0.0], "max"),
             "vote, blocking Allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, one, op=MPI.MAX)}
    calls = {k: max(10, args.calls // 20) if k.startswith("step") and h > 512 else args.calls
             for k in impls}
    for f in impls.values():  # warm-up
        for _ in range(5):
            f()
    times = {k: [] for k in impls}
    for _ in range(args.loops):
        for k, f in impls.items():
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                f()
            times[k].append((time.perf_counter() - t0) / calls[k])
    gathered = comm.gather(times, root=0)
    if comm.Get_rank() == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"{comm.Get_size()} ranks, MLP of {params} parameters, {args.loops} loops")
        for k in impls:
            worst = [max(g[k][i] for g in gathered) for i in range(args.loops)]
            print(f"{k:28s} median {np.median(worst) * 1e6:10.1f} us   min "
                  f"{min(worst) * 1e6:10.1f}   max {max(worst) * 1e6:10.1f}")
    reducer.exchange = agreed
    plain.comm.Free()
    hvd.shutdown()


if __name__ == "__main__":
    main()
