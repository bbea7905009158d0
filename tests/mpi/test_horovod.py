"""How the backend is chosen (auto on CPU, explicit, without Horovod) and what is particular to the
Horovod backend (knobs fixed per process, no bf16 wire, close, in-place allreduce)."""
import sys

import pytest
import torch

from dp_helpers import small_net
from hpcaccel.comm import horovod_unavailable, make_reducer
from hpcaccel.errors import UsageError
from support import requires_horovod as needs_horovod

pytestmark = pytest.mark.mpi(min_size=2)


@needs_horovod
def test_horovod_reducer_after_close_leaves_the_model_usable(comm):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    red = make_reducer("horovod", comm=comm)
    red.attach(model, opt)
    red.close()
    red.close()  # idempotent
    model(torch.randn(2, 10)).sum().backward()  # Horovod's hooks are inert now
    assert all(p.grad is not None for p in model.parameters())


@needs_horovod
def test_horovod_knobs_cannot_change_once_horovod_runs(comm):
    """Horovod reads its knobs once per process (tests/integration checks they take effect)."""
    make_reducer("horovod", comm=comm).close()  # Horovod runs now, with default knobs
    with pytest.raises(RuntimeError, match="HOROVOD_CYCLE_TIME cannot change"):
        make_reducer("horovod", comm=comm, cycle_time_ms=5.0)


def test_auto_on_cpu_uses_the_mpi_reducer_and_says_why(comm):
    red = make_reducer("auto", comm=comm, device="cpu")
    try:
        assert red.name == "mpi"
        assert "CPU" in red.chosen_because and "measured faster" in red.chosen_because
    finally:
        red.close()
    red = make_reducer("mpi", comm=comm)
    red.close()
    assert red.chosen_because is None  # explicit: nothing to explain


def test_without_horovod_auto_uses_mpi_and_explicit_is_a_usage_error(comm, monkeypatch, capfd):
    # None in sys.modules makes `import horovod.torch` fail, as on a machine without it.
    monkeypatch.setitem(sys.modules, "horovod", None)
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    assert horovod_unavailable().startswith("horovod.torch does not import")
    capfd.readouterr()
    red = make_reducer("auto", comm=comm)
    red.close()
    assert red.name == "mpi"
    assert "warning" not in capfd.readouterr().err  # the start-up line says why instead
    with pytest.raises(UsageError, match=r"^--backend horovod: not usable") as err:
        make_reducer("horovod", comm=comm)
    assert "\n" not in str(err.value)


@needs_horovod
def test_horovod_has_no_bf16_wire(comm):
    with pytest.raises(UsageError, match="bf16"):
        make_reducer("horovod", comm=comm, compression="bf16")


@needs_horovod
def test_horovod_allreduce_in_place(comm):
    size = comm.Get_size()
    red = make_reducer("horovod", comm=comm)
    try:
        t = torch.full((1000,), float(comm.Get_rank() + 1))
        assert red.allreduce_(t) is t
        torch.testing.assert_close(t, torch.full((1000,), size * (size + 1) / 2))
        assert red.allreduce_(torch.tensor([float(comm.Get_rank())]), "max").item() == size - 1
    finally:
        red.close()
