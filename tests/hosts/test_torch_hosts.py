"""hpcaccel.torch across 2 emulated hosts: the API's MPI tests, the DistributedOptimizer's and
the sharded optimizer's (reduce-scatter and allgather by the ring at 2x1, by the library
at 2x2) pass when ranks talk over TCP between hosts (ring or node-aware allreduce), and the
basics see the hosts: local ranks within a host, cross ranks between them."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTEST_RANK = os.path.join(ROOT, "scripts", "pytest_rank.sh")
LAYOUT = """
import hpcaccel.torch as hvd
hvd.init()
mine = (hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), hvd.cross_rank(),
        hvd.cross_size(), hvd.is_homogeneous())
for row in hvd.allgather_object(mine):
    if hvd.rank() == 0:
        print("layout", *row)
"""


@pytest.mark.parametrize("k", [1, 2], ids=["2x1", "2x2"])
def test_layout_across_hosts(hosts, k):
    r = hosts.run(k, sys.executable, "-c", LAYOUT, limit=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = sorted(tuple(line.split()[1:]) for line in r.stdout.splitlines() if line.startswith("layout"))
    n = hosts.count * k
    assert [int(row[0]) for row in rows] == list(range(n))
    for rank, size, local_rank, local_size, cross_rank, cross_size, homogeneous in rows:
        assert (int(size), int(local_size), int(cross_size), homogeneous) == (n, k, hosts.count, "True")
        assert int(local_rank) == int(rank) % k and int(cross_rank) == int(rank) // k


@pytest.mark.parametrize("k", [1, 2], ids=["2x1", "2x2"])
def test_api_and_optimizer_tests_across_hosts(hosts, k):
    tests = [os.path.join(ROOT, "tests", "mpi", name)
             for name in ("test_torch_api.py", "test_torch_optimizer.py",
                          "test_torch_reducescatter.py", "test_torch_shard.py",
                          "test_sharding.py")]
    r = hosts.run(k, "bash", PYTEST_RANK, *[t for t in tests if os.path.exists(t)], limit=600)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-2000:])
    assert " passed" in r.stdout
