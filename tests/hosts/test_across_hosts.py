"""hpcaccel across emulated hosts, unchanged for the user: node detection, both backends
training over TCP between hosts, 1-rank equivalence, checkpoints written on one host and
resumed by all, and a failing host or a hung rank ending the job.

Layouts: k ranks on each of `hosts.count` hosts (k = 1, 2). Ranks are unbound and share
this machine's CPUs, so keep models tiny and --threads 1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from support import BACKEND_PARAMS, assert_same_model

# Each rank records what env.detect says; rank 0 prints all of it as one line (mpirun can
# merge lines that ranks print at the same moment).
DETECT = """
import json
from mpi4py import MPI
from hpcaccel import env
w = env.detect()
rows = MPI.COMM_WORLD.gather(dict(rank=w.rank, size=w.size, local_rank=w.local_rank,
    local_size=w.local_size, nodes=w.nodes, node=w.node_name, hosts=list(w.hosts),
    threads=w.threads), root=0)
if w.rank == 0:
    print("WORLD " + json.dumps(rows))
"""


def summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("k", [1, 2])
def test_detect_reports_nodes_local_ranks_and_threads_per_host(hosts, k):
    r = hosts.run(k, sys.executable, "-c", DETECT, limit=120)
    assert r.returncode == 0, r.stderr[-3000:]
    [line] = [l for l in r.stdout.splitlines() if l.startswith("WORLD ")]
    rows = json.loads(line[len("WORLD "):])
    n = hosts.count * k
    assert [row["rank"] for row in rows] == list(range(n))
    assert {row["nodes"] for row in rows} == {hosts.count}
    assert {tuple(row["hosts"]) for row in rows} == {hosts.names}  # rank 0's host first
    for i, name in enumerate(hosts.names):  # ranks fill host by host: k on each
        mine = rows[i * k:(i + 1) * k]
        assert [row["node"] for row in mine] == [name] * k, rows
        assert [row["local_rank"] for row in mine] == list(range(k)), rows
        assert {row["local_size"] for row in mine} == {k}, rows
    # unbound ranks of one host split its CPUs; hosts do not count each other's ranks
    cpus = len(os.sched_getaffinity(0))
    assert {row["threads"] for row in rows} == {max(1, cpus // k)}, rows


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_digits_across_hosts_reaches_95_percent(hosts, tmp_path, backend):
    """The first job of the session also packs digits: one packer per host, same cache."""
    out = tmp_path / "run"
    r = hosts.train(2, out, "--data", "digits", "--epochs", "4", "--threads", "1", "--backend", backend)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(out)
    assert (s["world_size"], s["nodes"], s["backend"]) == (2 * hosts.count, hosts.count, backend)
    assert s["test_accuracy"] >= 0.95, s
    assert r.stdout.count(f"ranks on {hosts.count} node(s) ({', '.join(hosts.names)})") == 1, r.stdout


# tiny and deterministic: global order (shuffle off), the same global batch of 64
EQUIV = ["--data", "synthetic", "--synthetic-samples", "512", "--synthetic-shape", "16",
         "--synthetic-classes", "4", "--model", "mlp", "--epochs", "2", "--shuffle", "false",
         "--threads", "1", "--progress", "false"]


@pytest.fixture(scope="module")
def one_rank_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank")
    r = subprocess.run([sys.executable, "-m", "hpcaccel.train", *EQUIV, "--batch-size", "64",
                        "--backend", "mpi", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out / "model.pt", weights_only=True)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_2x2_across_hosts_equals_one_rank(hosts, tmp_path, backend, one_rank_model):
    k = 2
    batch = 64 // (hosts.count * k)
    r = hosts.train(k, tmp_path / "run", *EQUIV, "--batch-size", str(batch), "--backend", backend)
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(tmp_path / "run")["nodes"] == hosts.count
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert got.keys() == one_rank_model.keys()
    for name, want in one_rank_model.items():  # only the summation order differs
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)


# long enough to be signalled mid-run: 4 epochs of 128 steps at 2 x 1 ranks
LONG = ["--data", "synthetic", "--synthetic-samples", "4096", "--synthetic-shape", "32",
        "--model", "mlp", "--epochs", "4", "--batch-size", "16", "--threads", "1", "--backend", "mpi"]


def run_until(hosts, k, out, after_line, act, *args, limit=180, env=None):
    """Start a job across the hosts, call act(proc) once `after_line` is printed, wait for
    the end; (return code, output, seconds from act to the end)."""
    cmd = hosts.command(k, sys.executable, "-m", "hpcaccel.train", "--progress", "false",
                        "--out", out, *args, limit=limit)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    lines, acted = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if after_line in line:
                acted = time.monotonic()
                act(proc)
                break
        out_rest, _ = proc.communicate(timeout=limit + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + (out_rest or "")
    assert acted is not None, text
    return proc.returncode, text, time.monotonic() - acted


def mpirun_of(proc) -> int:
    """hosts.sh execs `timeout`, whose child is mpirun."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1, children
    return int(children[0])


def test_usr1_checkpoint_and_resume_across_hosts_equals_uninterrupted(hosts, tmp_path):
    """mpirun forwards SIGUSR1 to every rank on every host (as at a Slurm time limit); rank 0
    on host 1 writes the checkpoint; the resumed job reads it on both hosts."""
    full = tmp_path / "full"
    r = hosts.train(1, full, *LONG)
    assert r.returncode == 0, r.stderr[-3000:]

    part = tmp_path / "part"
    rc, text, _ = run_until(hosts, 1, part, "epoch 1/",
                            lambda p: os.kill(mpirun_of(p), signal.SIGUSR1), *LONG)
    assert rc == 3 and "stopped by SIGUSR1" in text, text[-3000:]  # checkpointed: requeue me
    assert not (part / "model.pt").exists()

    r = hosts.train(1, part, *LONG, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    assert_same_model(part / "model.pt", full / "model.pt")


def test_a_whole_host_failing_ends_the_job_within_30s(hosts, tmp_path):
    rc, text, seconds = run_until(hosts, 2, tmp_path / "run", "epoch 1/",
                                  lambda p: hosts.kill(hosts.count), *LONG,
                                  "--synthetic-samples", "1024", "--epochs", "100")
    assert rc != 0 and seconds < 30, (rc, seconds, text[-3000:])
    for i in range(1, hosts.count + 1):  # nothing left behind on any host
        deadline = time.monotonic() + 10
        while hosts.pids(i) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hosts.pids(i) == [], f"host {i} still runs {hosts.pids(i)}"


# A user model whose last rank hangs in its 5th training step.
HANGING = """
import os, time, torch
from mpi4py import MPI

class Hanging(torch.nn.Module):
    def __init__(self, shape, classes):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(shape).prod()), classes))
        self.calls = 0
    def forward(self, x):
        comm = MPI.COMM_WORLD
        if self.training:
            self.calls += 1
            if comm.Get_rank() == comm.Get_size() - 1 and self.calls == 5:
                time.sleep(3600)
        return self.net(x)

def hanging(shape, classes):
    return Hanging(shape, classes)
"""


def test_a_rank_hanging_on_one_host_is_caught_by_the_stall_watchdog(hosts, tmp_path):
    (tmp_path / "hangingmodel.py").write_text(HANGING)
    t0 = time.monotonic()
    r = hosts.train(2, tmp_path / "run", "--data", "digits", "--epochs", "3", "--threads", "1",
                    "--model", "hangingmodel:hanging", "--stall-timeout", "5",
                    env={"PYTHONPATH": str(tmp_path)}, limit=120)
    seconds = time.monotonic() - t0
    assert r.returncode != 0 and seconds < 100, (seconds, r.stderr[-3000:])  # start-up included
    assert "no progress for" in r.stderr, r.stderr[-3000:]
