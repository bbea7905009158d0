"""The Slurm templates on a cluster of several nodes: one slurmd per emulated host
(scripts/slurm_cluster.sh start 2x1 2), each node 2 sockets x 1 core. Jobs go through
`python -m hpcaccel.slurm render` and sbatch, as users submit them.

This cluster is a second one beside tests/slurm's one-node cluster (own BASE and port).
The job helpers (render, sbatch, polling with deadlines) are tests/slurm_support.py's Cluster.
"""
from __future__ import annotations

import json
import os

import pytest

from slurm_support import Cluster, probe, site  # noqa: F401  (fixtures shared with tests/slurm)
from support import assert_same_model

NODES = 2
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
    assert job["NodeList"] == "hpca-node[1-2]", job

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
    assert {j["NodeList"] for j in jobs} == {"hpca-node1", "hpca-node2"}, [j["NodeList"] for j in jobs]
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
