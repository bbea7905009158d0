"""A real single-node Slurm cluster for these tests, started by scripts/slurm_cluster.sh.

The tests run as one pytest process (no MPI); the jobs they submit run the real trainer
under srun --mpi=pmix or mpirun. Every wait polls scontrol with a deadline, so nothing hangs.
"""
from __future__ import annotations

import os

import pytest

from slurm_support import DEFAULT_LAYOUT, Cluster, probe, site  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root (it installs and starts slurmctld, "
                    "slurmd and munged, and its jobs run as root)")
    c = Cluster()
    was_running = c.script("status").returncode == 0
    c.ensure(DEFAULT_LAYOUT)
    yield c
    if was_running:
        c.ensure(DEFAULT_LAYOUT)  # leave it as we found it
    else:
        c.script("stop")


@pytest.fixture
def slurm(cluster):
    """The cluster in its default layout (2 sockets x 4 cores, 2 stand-in GPUs)."""
    cluster.ensure(DEFAULT_LAYOUT)
    return cluster
