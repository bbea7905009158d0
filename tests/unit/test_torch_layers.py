"""hpcaccel.torch's modules stand in layers (the error types and process sets alone), and
the agreement's fingerprint tells apart every difference the MPI tests check."""
import torch

from hpcaccel.torch import Average, Max, Sum
from hpcaccel.torch.agreement import descriptor
from hpcaccel.torch.collective_ops import AllgatherOp, AllreduceOp, BroadcastOp
from test_import_layers import imports


def test_the_torch_layers():
    """The error types and process sets stand alone; the engine knows nothing of basics (no
    circle anywhere: test_import_layers.py)."""
    graph = {m.rsplit(".", 1)[-1]: {d.rsplit(".", 1)[-1] for d in deps if d.startswith("hpcaccel.torch.")}
             for m, deps in imports().items() if m.startswith("hpcaccel.torch.")}
    assert not graph["errors"] and graph["process_sets"] <= {"errors", "unsupported"}
    assert "basics" not in graph["engine"]


def _allreduce(t, name="x", op=Sum, prescale=1.0):
    return AllreduceOp(name, [t], [t], op, prescale, 1.0, single=True)


def test_fingerprint_differs_wherever_ranks_may_differ():
    t = torch.ones(2)
    base = _allreduce(t).descriptor()
    assert base == _allreduce(torch.zeros(2)).descriptor() == _allreduce(t).descriptor()
    others = [_allreduce(torch.ones(3)), _allreduce(torch.ones(2, dtype=torch.float64)),
              _allreduce(t, op=Max), _allreduce(t, op=Average), _allreduce(t, name="y"),
              _allreduce(t, prescale=0.5), _allreduce(torch.ones(1, 2)),
              BroadcastOp("x", t, t, 0), AllgatherOp("x", [t], single=True)]
    prints = [op.descriptor() for op in others]
    assert base not in prints and len(set(prints)) == len(prints)
    assert BroadcastOp("x", t, t, 0).descriptor() != BroadcastOp("x", t, t, 1).descriptor()
    # allgather: the first dimension may differ, the others may not
    assert (AllgatherOp("x", [torch.ones(1, 3)], True).descriptor()
            == AllgatherOp("x", [torch.ones(5, 3)], True).descriptor()
            != AllgatherOp("x", [torch.ones(5, 2)], True).descriptor())
    # made once per layout: the same as made from the fields every time
    op = _allreduce(t, name="z")
    assert op.descriptor() == descriptor(op.kind, op.name, op.fields())
    assert all(any(d) for d in prints)  # never all zeros (a joined rank's contribution)
