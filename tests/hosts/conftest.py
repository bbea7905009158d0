"""Two emulated hosts (scripts/hosts.sh) for the tests of hpcaccel across nodes.

The hosts are network namespaces with their own hostnames on one bridge: ranks of one host
talk through shared memory, ranks of different hosts over TCP. They come up once per test
session and are ALWAYS taken down by name at its end, also when a test fails; a killed test
run leaves them for the next `up`, which removes leftovers first. Every job is bounded in
time twice: by the script's own `timeout` and by the subprocess timeout here.

Skip conditions live here only: not root, or a kernel without namespaces/bridges (the
script's exit code 3).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "hosts.sh")
HOSTS = 2
NAMES = tuple(f"hpca-node{i}" for i in range(1, HOSTS + 1))


def hosts_script(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


class Hosts:
    """The emulated hosts: launch jobs across them, make one of them fail."""

    count = HOSTS
    names = NAMES

    @staticmethod
    def command(k: int, *cmd, limit: int = 240) -> list[str]:
        """mpirun across every host with k ranks each, killed after `limit` seconds."""
        return ["bash", SCRIPT, "run", str(k), "--timeout", str(limit), *map(str, cmd)]

    def run(self, k: int, *cmd, limit: int = 240, env=None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(k, *cmd, limit=limit), capture_output=True, text=True,
                              timeout=limit + 30, env={**os.environ, **(env or {})})

    def train(self, k: int, out, *args, limit: int = 240, env=None) -> subprocess.CompletedProcess:
        """`python -m hpcaccel.train` with k ranks on every host, writing to `out`."""
        return self.run(k, sys.executable, "-m", "hpcaccel.train", "--progress", "false",
                        "--out", out, *args, limit=limit, env=env)

    @staticmethod
    def kill(i: int) -> None:
        """Host i fails: every process in its namespace gets SIGKILL."""
        r = hosts_script("kill", str(i))
        assert r.returncode == 0, r.stderr

    @staticmethod
    def pids(i: int) -> list[str]:
        """Processes still running on host i."""
        return subprocess.run(["ip", "netns", "pids", f"hpca-h{i}"], capture_output=True,
                              text=True, timeout=10).stdout.split()


@pytest.fixture(scope="session")
def hosts():
    if os.geteuid() != 0:
        pytest.skip("emulated hosts need root (network namespaces, a bridge)")
    r = hosts_script("up", str(HOSTS))
    if r.returncode == 3:
        pytest.skip("emulated hosts unavailable: " + (r.stderr.strip() or r.stdout.strip()))
    assert r.returncode == 0, f"hosts.sh up failed:\n{r.stdout}\n{r.stderr}"
    try:
        yield Hosts()
    finally:
        down = hosts_script("down")
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """A fresh cache for built-in datasets: the first job across hosts packs them with one
    packer per host at once, on this shared filesystem."""
    old = os.environ.get("HPCACCEL_DATA")
    os.environ["HPCACCEL_DATA"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    if old is None:
        os.environ.pop("HPCACCEL_DATA", None)
    else:
        os.environ["HPCACCEL_DATA"] = old
