"""Slurm test helpers shared by tests/slurm (one-node cluster) and tests/hosts (a cluster
of several emulated nodes): the Cluster driver (scripts/slurm_cluster.sh, render, sbatch,
polling with deadlines, so nothing hangs) and the fixtures every job uses."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "slurm_cluster.sh")
BASE = os.environ.get("HPCACCEL_SLURM_BASE", "/tmp/hpcaccel-slurm")
DEFAULT_LAYOUT = "2x4"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# What a probe records about each rank before it becomes the trainer (see `probe` below).
PROBE = '''
import json, os, socket, sys
if os.environ.get("HPCACCEL_PROBE_DIR") and sys.argv[1:3] == ["-m", "hpcaccel.train"]:
    env = os.environ
    rank = env.get("OMPI_COMM_WORLD_RANK") or env.get("PMIX_RANK") or env.get("SLURM_PROCID")
    keep = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS",
            "CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
    record = {"rank": int(rank), "host": socket.gethostname(),
              "cpus": sorted(os.sched_getaffinity(0)), "env": {k: env.get(k) for k in keep}}
    path = os.path.join(env["HPCACCEL_PROBE_DIR"], f"rank-{rank}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(record, fh)
    os.replace(path + ".tmp", path)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
'''


class Cluster:
    def __init__(self):
        self.env = {**os.environ, "SLURM_CONF": os.path.join(BASE, "etc", "slurm.conf")}
        self.layout = None

    def script(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True,
                              timeout=900, env=self.env)

    def ensure(self, layout: str = DEFAULT_LAYOUT) -> None:
        """Running with this node layout (a restart takes well under a second)."""
        if layout == self.layout:
            return
        r = self.script("start", layout)
        if r.returncode == 3:  # cannot run here: not root, no apt
            pytest.skip("Slurm test cluster unavailable: " + (r.stderr.strip() or r.stdout.strip()))
        assert r.returncode == 0, f"slurm_cluster.sh start {layout} failed:\n{r.stdout}\n{r.stderr}"
        self.layout = layout

    def run(self, *cmd, check=True) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=self.env)
        if check:
            assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"
        return r.stdout

    def render(self, *args) -> str:
        r = subprocess.run([sys.executable, "-m", "hpcaccel.slurm", "render", *args],
                           capture_output=True, text=True, timeout=60, env=self.env, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def sbatch(self, script: str, path) -> str:
        """Write the rendered script to `path` (a record for the reader) and submit it."""
        path.write_text(script)
        return self.run("sbatch", "--parsable", str(path)).strip().split(";")[0]

    def jobs(self, jobid: str) -> list[dict]:
        """scontrol's view of a job (or every task of an array), one dict per job."""
        out = self.run("scontrol", "show", "job", "-o", jobid, check=False)
        return [dict(re.findall(r"([^\s=]+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, jobid: str, timeout: float = 180, until=None) -> list[dict]:
        """Poll until every job (array task) is in a terminal state and `until(jobs)` holds;
        on timeout cancel the job and fail with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(jobid)
            if jobs and all(j.get("JobState") in TERMINAL for j in jobs) and (until is None or until(jobs)):
                return jobs
            time.sleep(0.5)
        self.run("scancel", jobid, check=False)
        pytest.fail(f"job {jobid} not finished after {timeout} s: {self.jobs(jobid)}")

    def wait_for_line(self, log, needle: str, jobid: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and needle in log.read_text():
                return
            states = {j.get("JobState") for j in self.jobs(jobid)}
            if states and states <= TERMINAL:
                pytest.fail(f"job {jobid} ended ({states}) before printing {needle!r}:\n"
                            + (log.read_text() if log.exists() else "(no log)"))
            time.sleep(0.2)
        self.run("scancel", jobid, check=False)
        pytest.fail(f"job {jobid}: no {needle!r} in {log} after {timeout} s")


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """Template settings every test job uses: the project's venv, a shared data cache."""
    data = tmp_path_factory.mktemp("data-cache")
    return ["--set", f"venv={os.path.join(ROOT, '.venv')}", "--env", f"HPCACCEL_DATA={data}"]


@pytest.fixture
def probe(tmp_path):
    """(python wrapper, probe dir): use the wrapper as the template's python to have each
    rank record its CPU affinity, GPUs and thread settings before it becomes the trainer."""
    wrapper = tmp_path / "probe-python"
    wrapper.write_text(f"#!{sys.executable}\n{PROBE}")
    wrapper.chmod(0o755)
    out = tmp_path / "probe"
    out.mkdir()
    return wrapper, out
