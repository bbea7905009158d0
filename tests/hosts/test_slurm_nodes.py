"""The Slurm templates on a cluster of several nodes: one slurmd per emulated host
(scripts/slurm_cluster.sh start 2x1 2), each node 2 sockets x 1 core. Jobs go through
`python -m hpcaccel.slurm render` and sbatch, as users submit them. The nodes' Slurm names
(hpca-cn1, hpca-cn2) are not host names (the hosts are hpca-node1, hpca-node2): Slurm
reaches them at their NodeAddr, and nothing may take a node name for a host name.

This cluster is a second one beside tests/slurm's one-node cluster (own BASE and port).
The job helpers (render, sbatch, polling with deadlines) are tests/slurm_support.py's Cluster.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from slurm_support import TERMINAL, Cluster, probe, site  # noqa: F401  (fixtures shared with tests/slurm)
from support import assert_same_model

NODES = 2
NAMES = [f"hpca-cn{i}" for i in range(1, NODES + 1)]  # Slurm's NodeName of host i (hpca-nodeI)
LAYOUT = "2x1"  # sockets x cores per node: the machine's 2 real CPUs, so binding is real
BASE = "/tmp/hpcaccel-slurm-nodes"
DIGITS = ["--data", "digits", "--epochs", "1", "--backend", "mpi"]
ROOT_OK = ["--env", "OMPI_ALLOW_RUN_AS_ROOT=1", "--env", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"]


class NodesCluster(Cluster):
    def __init__(self):
        super().__init__()
        self.env = {**os.environ, "HPCACCEL_SLURM_BASE": BASE,
                    "SLURM_CONF": os.path.join(BASE, "etc", "slurm.conf")}

    def ensure(self, layout: str = LAYOUT) -> None:
        r = self.script("start", layout, str(NODES))
        if r.returncode == 3:
            pytest.skip("Slurm test cluster unavailable: " + (r.stderr.strip() or r.stdout.strip()))
        assert r.returncode == 0, f"slurm_cluster.sh start {layout} {NODES} failed:\n{r.stdout}\n{r.stderr}"


@pytest.fixture(scope="module")
def nodes(hosts):
    """The two-node cluster on the emulated hosts; stopped at the end (the hosts fixture
    then takes the hosts down, killing anything left inside them)."""
    c = NodesCluster()
    c.ensure()
    try:
        yield c
    finally:
        c.script("stop", str(NODES))


@pytest.fixture
def cluster(nodes):
    nodes.ensure()  # a test before may have killed a host's slurmd: restarted if so
    return nodes




def _records(probe_dir):
    return sorted((json.loads(p.read_text()) for p in probe_dir.glob("rank-*.json")), key=lambda r: r["rank"])


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _json_or_none(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _completed(jobs, tmp_path):
    states = [j["JobState"] for j in jobs]
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert states == ["COMPLETED"] * len(jobs), f"{states}\n{logs}"


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_cpu_template_on_2_nodes_runs_a_rank_per_socket_on_each_node(cluster, site, probe, tmp_path, launcher):
    wrapper, probe_dir = probe
    script = cluster.render("cpu", "--nodes", str(NODES), "--set", "cores_per_socket=1",
                            "--set", f"chdir={tmp_path}", "--set", f"launcher={launcher}",
                            "--set", f"python={wrapper}", "--time", "00:10:00",
                            "--env", f"HPCACCEL_PROBE_DIR={probe_dir}", *ROOT_OK, *site, "--", *DIGITS)
    assert "#SBATCH --nodes=2" in script
    jobid = cluster.sbatch(script, tmp_path / "job.sbatch")
    [job] = cluster.wait(jobid, timeout=240)
    _completed([job], tmp_path)
    assert job["NodeList"] == "hpca-cn[1-2]", job

    got = _records(probe_dir)
    assert [r["rank"] for r in got] == list(range(2 * NODES)), got
    for i in range(NODES):  # two ranks on each node, each on its own socket's core
        mine = [r for r in got if r["host"] == f"hpca-node{i + 1}"]
        assert len(mine) == 2, got
        if launcher == "srun":  # task/affinity binds; mpirun --bind-to socket does its own
            assert sorted(tuple(r["cpus"]) for r in mine) == [(0,), (1,)], got
    s = _summary(tmp_path / "runs" / f"hpcaccel-{jobid}")
    assert (s["world_size"], s["nodes"], s["threads_per_rank"]) == (2 * NODES, NODES, 1), s


def test_sweep_tasks_run_on_both_nodes(cluster, site, tmp_path):
    sweep = tmp_path / "lr.toml"
    sweep.write_text("[grid]\nlr = [0.1, 0.05, 0.02, 0.01]\n")
    sweep_dir = tmp_path / "sweep"
    # each task asks for a whole node (2 CPUs): two run at once, one on each node
    script = cluster.render("sweep", "--sweep", str(sweep), "--set", "cpus_per_rank=2",
                            "--set", f"sweep_dir={sweep_dir}", "--set", f"chdir={tmp_path}",
                            *site, "--", "--data", "digits", "--epochs", "1", "--threads", "1")
    jobid = cluster.sbatch(script, tmp_path / "job.sbatch")
    jobs = cluster.wait(jobid, timeout=300)
    assert len(jobs) == 4
    _completed(jobs, tmp_path)
    assert {j["NodeList"] for j in jobs} == set(NAMES), [j["NodeList"] for j in jobs]
    for i, lr in enumerate([0.1, 0.05, 0.02, 0.01]):
        assert _summary(sweep_dir / f"task-{i}")["config"]["lr"] == lr


# long enough to be signalled mid-run: 6 epochs of 64 steps at 4 ranks
LONG = ["--data", "synthetic", "--synthetic-samples", "4096", "--synthetic-shape", "32",
        "--model", "mlp", "--epochs", "6", "--batch-size", "16", "--backend", "mpi", "--threads", "1"]


def _long_job(cluster, site, tmp_path, name):
    run_dir = tmp_path / name
    script = cluster.render("cpu", "--nodes", str(NODES), "--set", "cores_per_socket=1",
                            "--set", f"chdir={tmp_path}", "--job-name", name, "--set", f"run_dir={run_dir}",
                            "--time", "00:10:00", "--set", "signal_seconds=60", *ROOT_OK, *site, "--", *LONG)
    return cluster.sbatch(script, tmp_path / f"{name}.sbatch"), run_dir


def test_usr1_requeue_on_2_nodes_resumes_to_the_uninterrupted_result(cluster, site, tmp_path):
    ref_id, ref_dir = _long_job(cluster, site, tmp_path, "reference")
    _completed(cluster.wait(ref_id, timeout=300), tmp_path)

    jobid, run_dir = _long_job(cluster, site, tmp_path, "requeued")
    log = tmp_path / f"requeued-{jobid}.out"
    cluster.wait_for_line(log, "epoch 1/6", jobid, timeout=180)
    cluster.run("scancel", "--batch", "--signal=USR1", jobid)  # what Slurm does near the limit
    [job] = cluster.wait(jobid, timeout=300)
    text = log.read_text()
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), text
    assert "stopped by SIGUSR1" in text and "resuming from" in text, text
    assert _summary(run_dir)["nodes"] == NODES

    assert_same_model(run_dir / "model.pt", ref_dir / "model.pt")


# elastic: 2 nodes x 2 ranks, global batch 4 x 8 = 32, shuffle off, so the run continued on
# the node left (2 ranks x 16 in micro-batches of 8) takes the very same global batches
ELASTIC = ["--data", "synthetic", "--synthetic-samples", "4096", "--synthetic-shape", "32",
           "--model", "mlp", "--epochs", "3", "--batch-size", "8", "--shuffle", "false",
           "--backend", "mpi"]


@pytest.fixture(scope="module")
def uninterrupted_accuracy(site, tmp_path_factory):
    """The same training without a lost node: 1 rank x 32 (shuffle off: the same math)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    exports = [site[i + 1] for i, flag in enumerate(site) if flag == "--env"]
    env = {**os.environ, **dict(e.split("=", 1) for e in exports)}  # the jobs' data cache
    r = subprocess.run([sys.executable, "-m", "hpcaccel.train", *ELASTIC, "--batch-size", "32",
                        "--threads", "1", "--progress", "false", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return _summary(out)["test_accuracy"]


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_elastic_job_goes_on_on_the_node_left_when_a_node_is_lost(
        cluster, hosts, site, tmp_path, uninterrupted_accuracy, launcher):
    run_dir = tmp_path / "run"
    script = cluster.render("cpu", "--elastic", "--nodes", str(NODES), "--min-nodes", "1",
                            "--set", "cores_per_socket=1", "--set", f"chdir={tmp_path}",
                            "--job-name", "elastic", "--set", f"run_dir={run_dir}",
                            "--set", f"launcher={launcher}",
                            "--time", "00:10:00", "--set", "signal_seconds=60",
                            "--set", "probe_seconds=3", "--set", "checkpoint_seconds=5",
                            *ROOT_OK, *site, "--", *ELASTIC)
    assert "#SBATCH --no-kill" in script
    slurmd_log = os.path.join(BASE, "log", f"slurmd-{NAMES[0]}.log")
    logged = os.path.getsize(slurmd_log)
    jobid = cluster.sbatch(script, tmp_path / "elastic.sbatch")
    log = tmp_path / f"elastic-{jobid}.out"
    cluster.wait_for_line(log, "epoch 1/3", jobid, timeout=240)
    time.sleep(2)  # into the second epoch, past a timed checkpoint or not
    killed = time.time()
    hosts.kill(2)  # every process of hpca-node2 (its slurmd and its ranks) dies
    with open(slurmd_log, errors="replace") as fh:  # what node 1's slurmd logged meanwhile
        fh.seek(logged)
        before_the_loss = fh.read()

    # the relaunched run's first step: rank 0 writes progress.json at once
    first_step, deadline = None, time.monotonic() + 300
    while first_step is None and time.monotonic() < deadline:
        progress = _json_or_none(run_dir / "progress.json")
        if progress and progress["world_size"] == 2:
            first_step = progress["time"]
        elif {j.get("JobState") for j in cluster.jobs(jobid)} <= TERMINAL:
            break
        time.sleep(0.2)
    [job] = cluster.wait(jobid, timeout=300)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED", text
    # told by Slurm's controller: hpca-cn2 resolves to no host
    lost = re.search(r"hpcaccel: elastic: lost node\(s\) hpca-cn2 at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d): "
                     r".*Slurm reports hpca-cn2 (\S*NOT_RESPONDING|DOWN\S*)", text)
    assert lost, text
    assert "relaunching at" in text and "on the 1 node(s) left (hpca-cn1)" in text, text
    # asking the controller opens no connection to a slurmd: none logs an empty one
    assert "Zero Bytes were transmitted" not in before_the_loss, before_the_loss[-3000:]
    assert "2 ranks continue the checkpoint of 4 ranks: global batch 32 kept as 2 x " \
           "--batch-size 16 with --accum-steps 2" in text, text

    s = _summary(run_dir)
    assert (s["world_size"], s["nodes"], s["restarts"], s["steps"]) == (2, 1, 1, 3 * 128), s
    assert s["test_accuracy"] == pytest.approx(uninterrupted_accuracy, abs=0.01)
    stamp = lambda text: time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))  # noqa: E731
    detected = stamp(lost.group(1))
    relaunched = stamp(re.search(r"relaunching at (\S+)", text).group(1))
    last = s["last_restart"]
    print(f"\nelastic ({launcher}): node lost -> detected {detected - killed:.0f} s (Slurm: "
          f"{lost.group(2)}; probe every 3 s, SlurmdTimeout 30 s) -> relaunched "
          f"{relaunched - killed:.0f} s; "
          f"lost -> first step of the relaunched run "
          f"{(first_step - killed) if first_step else float('nan'):.1f} s; steps lost "
          f"{s['steps_lost']} ({last['seconds_lost']} s of work past the checkpoint); "
          f"the whole job {job.get('RunTime')}")
    assert first_step is not None and first_step - killed < 120
