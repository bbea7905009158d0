"""The mpi reducer's allreduce algorithms across emulated hosts (TCP between hosts, shared
memory within one): --allreduce auto picks ring at 1 rank per host and hierarchical at 2,
every algorithm sums exactly like MPI_Allreduce with identical bits on every rank, and
training with each algorithm gives the same model as the library's allreduce.

Ranks are unbound and share this machine's CPUs: small buffers and a tiny model.
"""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

# Each rank: the auto choice, then every algorithm on awkward lengths against MPI_Allreduce.
CHECK = """
import json, numpy as np
from mpi4py import MPI
from hpcaccel.comm.allreduce_choice import make_algorithm
world = MPI.COMM_WORLD
auto = make_algorithm(world, "auto")
ok = []
for name in ("sliced", "ring", "hierarchical"):
    algo = make_algorithm(world, name)
    for n in (0, 1, 3, 4099, 300_001):
        for dtype in (np.float32, np.int64):
            got = ((np.arange(n) * 7 + world.rank * 13) % 101 - 50).astype(dtype)
            want = got.copy()
            world.Allreduce(MPI.IN_PLACE, want)
            algo.allreduce_(got, MPI.SUM)
            same = world.allgather(got.tobytes())
            ok.append(bool(np.array_equal(got, want)) and all(s == same[0] for s in same))
    getattr(algo, "close", lambda: None)()
rows = world.gather(dict(auto=auto.name, ok=all(ok)), root=0)
if world.rank == 0:
    print("ALGOS " + json.dumps(rows))
"""


@pytest.mark.parametrize("k, want", [(1, "ring"), (2, "hierarchical")])
def test_auto_choice_and_every_algorithm_sums_exactly(hosts, k, want):
    r = hosts.run(k, sys.executable, "-c", CHECK, limit=180)
    assert r.returncode == 0, r.stderr[-3000:]
    [line] = [l for l in r.stdout.splitlines() if l.startswith("ALGOS ")]
    rows = json.loads(line[len("ALGOS "):])
    assert len(rows) == hosts.count * k
    assert {row["auto"] for row in rows} == {want}
    assert all(row["ok"] for row in rows), rows


TRAIN = ("--data", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "16",
         "--threads", "1", "--backend", "mpi", "--seed", "3")


@pytest.mark.parametrize("k", [1, 2])
def test_training_with_each_algorithm_gives_the_same_model(hosts, tmp_path, k):
    """Same data, seed and world size: the ring and hierarchical sums differ from the
    library's only in rounding order, so the trained weights agree to float tolerance; the
    start-up line names the algorithm auto chose."""
    models = {}
    for algo in ("sliced", "auto"):
        out = tmp_path / f"{algo}-{k}"
        r = hosts.train(k, out, *TRAIN, "--allreduce", algo, limit=240)
        assert r.returncode == 0, r.stderr[-3000:]
        models[algo] = torch.load(out / "model.pt")
        if algo == "auto":
            assert ("hierarchical" if k > 1 else "ring") in r.stdout, r.stdout[-2000:]
            # --bucket-mb auto measured the link across hosts and said what it chose
            assert re.search(r"buckets \d+ MiB \(auto: latency \d+ us, [\d.]+ GB/s\)", r.stdout), \
                r.stdout[-2000:]
    for name, tensor in models["sliced"].items():
        torch.testing.assert_close(models["auto"][name], tensor, rtol=1e-4, atol=1e-5)
