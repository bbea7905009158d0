import os
import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Built-in datasets are packed once per test session, away from the user's cache."""
    old = os.environ.get("HPCACCEL_DATA")
    os.environ["HPCACCEL_DATA"] = str(tmp_path_factory.getbasetemp() / "data-cache")
    yield
    if old is None:
        del os.environ["HPCACCEL_DATA"]
    else:
        os.environ["HPCACCEL_DATA"] = old


@pytest.fixture(autouse=True)
def no_mpi_in_the_test_process():
    """These tests start real jobs with mpirun. A test process that has initialised MPI (a
    singleton) hands its PMIx variables to every child at the C level, and mpirun then exits
    1 without a word; say so instead of failing mysteriously."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        pytest.fail("MPI was initialised in the pytest process by an earlier test; tests that "
                    "need MPI in-process belong in tests/mpi (run under mpirun)")
