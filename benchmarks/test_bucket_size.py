"""--bucket-mb auto against fixed bucket sizes: training throughput of the throughput
benchmark's models (the 25M MLP and the CNN) through the mpi reducer, configurations
interleaved within each repeat so load drifts hit all of them alike. Runs wherever the
world runs: one host (`scripts/mpirun.sh 2 python -m pytest benchmarks/test_bucket_size.py
--with-mpi -s`) or across emulated hosts (`scripts/hosts.sh run 1 bash
scripts/pytest_rank.sh benchmarks/test_bucket_size.py -s`). Records, never asserts.
"""
import os
import statistics

import pytest

import test_throughput as tp
from test_throughput import datasets  # noqa: F401  (its fixture: one synthetic file per model)

pytestmark = pytest.mark.mpi(min_size=2)
BATCH = 64
FIXED_MIB = (1, 4, 25)  # 25: the size before auto


def plan(smoke):
    """(timed steps, warm-up steps, repeats)."""
    return (2, 1, 1) if smoke else (int(os.environ.get("HPCACCEL_BENCH_STEPS", "10")), 3, 3)


@pytest.mark.parametrize("model_name", list(tp.MODELS))
def test_bucket_size_auto_against_fixed(comm, smoke, datasets, record, model_name):
    from hpcaccel.comm.allreduce_choice import resolve
    from hpcaccel.comm.hierarchical import node_layout

    local, hosts, per_host = node_layout(comm)
    local.Free()
    steps, warmup, repeats = plan(smoke)
    configs = {"auto": None, **{f"{mb} MiB": mb << 20 for mb in FIXED_MIB}}
    rates = {name: [] for name in configs}
    breakdowns = {name: [] for name in configs}
    chosen = {}
    for _ in range(repeats):
        for name, bucket_bytes in configs.items():
            info = {}
            seconds, br = tp.run_hpcaccel(comm, "mpi", model_name, datasets[model_name], BATCH,
                                          steps, warmup, info=info, bucket_bytes=bucket_bytes)
            rates[name].append(steps * BATCH * comm.Get_size() / seconds)
            breakdowns[name].append(br)
            if bucket_bytes is None:
                chosen.setdefault("bucket_mib", []).append(info["bucket_bytes"] / 2**20)
                chosen["describe"] = info["describe"]
    results = {n: {"samples_per_second": tp.summary(r),
                   "breakdown_seconds_per_step": {k: statistics.fmean(b[k] for b in breakdowns[n])
                                                  for k in breakdowns[n][0]}}
               for n, r in rates.items()}
    record(f"bucket-size-{model_name}-{hosts}x{per_host}",
           {"ranks": comm.Get_size(), "hosts": hosts, "ranks_per_host": per_host,
            "algorithm": resolve("auto", hosts, per_host), "model": model_name,
            "batch_per_rank": BATCH, "steps": steps, "repeats": repeats, "auto": chosen,
            "results": results})
    if comm.Get_rank() == 0:
        print(f"\n{model_name} at {hosts} host(s) x {per_host}: auto chose "
              f"{chosen['bucket_mib']} MiB ({chosen['describe']})")
        for n, e in results.items():
            s, br = e["samples_per_second"], e["breakdown_seconds_per_step"]
            print(f"  {n:8s} {s['mean']:8.1f} samples/s {[round(v) for v in s['values']]}  "
                  f"compute {br['compute'] * 1e3:.0f} ms, comm wait {br['comm_wait'] * 1e3:.0f} ms",
                  flush=True)
    comm.Barrier()
