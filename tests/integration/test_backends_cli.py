"""Backends under real mpirun, each job a fresh set of processes: Horovod's knobs take
effect (Horovod reads them once per process), and the training CLI runs on both backends."""
import json

import pytest

from support import BACKEND_PARAMS, mpirun_python as mpirun, train_cli
from support import requires_horovod as needs_horovod


# Back-to-back small allreduces each wait for Horovod's next cycle: with a 100 ms cycle,
# 4 of them take at least ~300 ms, a lower bound only the knob can cause (noise only adds).
CYCLE_PROBE = """
import os, time
import torch
from hpcaccel.comm import make_reducer
red = make_reducer("horovod", cycle_time_ms={cycle}, fusion_bytes=1 << 20)
assert "HOROVOD_CYCLE_TIME" not in os.environ  # applied to Horovod, not left behind
red.allreduce_(torch.ones(1))
t0 = time.perf_counter()
for _ in range(4):
    red.allreduce_(torch.ones(1))
seconds = time.perf_counter() - t0
# one line, from rank 0: mpirun may merge lines that ranks print at the same moment
fastest = red.comm.allreduce(seconds, op=__import__("mpi4py").MPI.MIN)
if red.rank == 0:
    print("seconds", fastest)
red.close()
"""


@needs_horovod
def test_horovod_cycle_time_takes_effect():
    r = mpirun(2, "-c", CYCLE_PROBE.format(cycle=100.0))
    assert r.returncode == 0, r.stderr[-3000:]
    seconds = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("seconds")]
    assert len(seconds) == 1 and seconds[0] >= 0.25, r.stdout


def train(np_, out, *args):
    return train_cli(np_, "--out", str(out), "--data", "synthetic", "--synthetic-samples", "512",
                     "--synthetic-shape", "1,8,8", "--model", "mlp", "--epochs", "2", *args)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_train_with_accumulation(tmp_path, backend):
    r = train(2, tmp_path / "run", "--backend", backend, "--accum-steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["backend"] == backend and summary["config"]["accum_steps"] == 4
    assert summary["steps"] == 2 * (512 // (16 * 2))  # accumulation splits batches, not steps
    if backend == "horovod":  # the start-up line says which of Horovod's operations run
        assert "horovod (CPU operations: MPI" in r.stdout and "GPU operations: " in r.stdout, \
            r.stdout[:2000]


@needs_horovod
def test_bf16_on_horovod_is_a_usage_error(tmp_path):
    r = train(2, tmp_path / "run", "--backend", "horovod", "--compression", "bf16")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("hpcaccel: error")]
    assert len(errors) == 1 and "--compression bf16" in errors[0], r.stderr[-2000:]
