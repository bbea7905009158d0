"""Shared pieces of the MPI tests. Every test here runs on every rank (pytest-mpi);
assertions are written in terms of the communicator's size so they hold at any rank count,
and the reducer's contract is checked on the world, a duplicate of it and a one-rank
communicator (COMM_SELF), as mpi4py's own suite does."""
import pytest

from support import BACKEND_PARAMS


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    return request.param


@pytest.fixture
def make(backend, comm):
    """make(**options) -> a reducer of the parametrized backend (on COMM_WORLD unless
    comm= is given)."""
    from hpcaccel.comm import make_reducer

    def factory(**kw):
        kw.setdefault("comm", comm)
        return make_reducer(backend, **kw)
    return factory


@pytest.fixture
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(params=["world", "world-dup", "self"], ids=["comm-world", "comm-dup", "comm-self"])
def contract_comm(request, backend):
    """Each communicator the reducer contract must hold on. Horovod runs on one communicator
    per process (the job's, started once), so it is checked on the world only."""
    from mpi4py import MPI

    if backend == "horovod" and request.param != "world":
        pytest.skip("Horovod runs on the job's communicator only")
    if request.param == "self":
        yield MPI.COMM_SELF
    elif request.param == "world":
        yield MPI.COMM_WORLD
    else:
        dup = MPI.COMM_WORLD.Dup()
        yield dup
        dup.Free()


@pytest.fixture
def wrap():
    """wrap(optimizer, **kw) -> hpcaccel.torch's DistributedOptimizer; their reducers are
    closed after the test (a reducer would otherwise go when its optimizer is collected)."""
    from hpcaccel.torch.optimizer import DistributedOptimizer

    made = []

    def factory(optimizer, **kw):
        opt = DistributedOptimizer(optimizer, **kw)
        made.append(opt)
        return opt
    yield factory
    for opt in made:
        opt._hvd_finalizer()
