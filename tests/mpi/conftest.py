"""Shared pieces of the MPI tests. Every test here runs on every rank (pytest-mpi);
assertions are written in terms of the world size so they hold at any rank count."""
import pytest

# Backends the reducer and equivalence tests are parametrized over.
def _horovod_param():
    from hpcaccel.comm import horovod_unavailable
    why = horovod_unavailable()
    return pytest.param("horovod", marks=pytest.mark.skipif(
        why is not None, reason=f"Horovod not usable: {why}"))


BACKENDS = ["mpi", _horovod_param()]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make(backend, comm):
    """make(**options) -> a reducer of the parametrized backend on COMM_WORLD."""
    from hpcaccel.comm import make_reducer

    def factory(**kw):
        kw.setdefault("comm", comm)
        return make_reducer(backend, **kw)
    return factory


@pytest.fixture
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD
