"""hpcaccel.torch's modules import each other without a circle (lazy imports counted), and
the agreement's fingerprint tells apart every difference the MPI tests check."""
import ast
import os

import torch

from hpcaccel.torch import Average, Max, Sum
from hpcaccel.torch.agreement import descriptor
from hpcaccel.torch.collective_ops import AllgatherOp, AllreduceOp, BroadcastOp

TORCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "hpcaccel", "torch")


def imports() -> dict:
    """module -> the hpcaccel.torch modules it imports, anywhere in it."""
    names = {f[:-3] for f in os.listdir(TORCH) if f.endswith(".py")}
    graph = {}
    for name in names:
        with open(os.path.join(TORCH, name + ".py")) as fh:
            tree = ast.parse(fh.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else
                            [a.name for a in node.names])
        graph[name] = deps & names - {name}
    return graph


def test_no_import_circle():
    graph, done, path = imports(), set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
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
