"""hvd.join() as Horovod 0.28.1 defines it, on real MPI: ranks with fewer batches join and
take part in the others' allreduces (tensor allreduces, DistributedOptimizer's gradients,
control votes) with zeros; Average still divides by every rank; join returns the rank that
joined last; allgather and broadcast are refused while a rank has joined; collective counts
stay equal on every rank. Assertions in terms of the world size, at any rank count."""
import pytest
import torch

import hpcaccel.torch as hvd
from hpcaccel.collectives import TRACKER
from hpcaccel.torch.basics import runtime


@pytest.fixture(autouse=True, scope="module")
def initialized():
    hvd.init()
    yield
    hvd.shutdown()


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 3, generator=g, dtype=torch.float64)


def loss_of(model, x):
    return (model(x) ** 2).mean()


def steps_of(rank, n):
    """Uneven: rank 0 has the most batches, each further rank one fewer (at least one)."""
    return max(1, n + 1 - rank)


def test_joined_ranks_add_zeros_to_gradients_allreduces_and_votes(wrap):
    r, n = hvd.rank(), hvd.size()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    reference = torch.nn.Linear(3, 2).double()
    reference.load_state_dict(model.state_dict())
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1),
               named_parameters=model.named_parameters())
    active_counts, votes = [], []
    for step in range(steps_of(r, n)):
        opt.zero_grad()
        loss_of(model, batch(r, step)).backward()
        opt.step()
        active_counts.append(hvd.allreduce(torch.tensor(1.0), name="active", op=hvd.Sum).item())
        votes.append(runtime().control.allreduce([1.0])[0])
    last = hvd.join()
    assert last == 0  # rank 0 has the most batches: it joins last, on every rank
    # every rank that was still stepping saw the ranks that had not joined yet
    expect = [sum(1 for q in range(n) if steps_of(q, n) > s) for s in range(steps_of(r, n))]
    assert active_counts == expect and votes == expect
    # the gradient of each step: the active ranks' gradients summed, divided by all ranks
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(steps_of(r, n)):
        sgd.zero_grad()
        for q in range(n):
            if steps_of(q, n) > step:
                loss_of(reference, batch(q, step)).backward()
        for p in reference.parameters():
            p.grad /= n
        sgd.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a joined rank counted the collectives it took part in: counts stay equal everywhere
    assert len({repr(s) for s in hvd.allgather_object(TRACKER.seq)}) == 1


def test_average_divides_by_every_rank_and_join_can_repeat():
    r, n = hvd.rank(), hvd.size()
    for epoch in range(2):
        got = None
        if r == 0:  # every other rank joins at once; rank 0 averages alone, then joins
            got = hvd.allreduce(torch.full((2,), 6.0), name=f"lonely.{epoch}").tolist()
        assert hvd.join() == 0
        if r == 0:
            assert got == [6.0 / n] * 2  # Horovod: joined ranks count in the average
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == n  # all in step again


def test_allgather_and_broadcast_are_refused_while_a_rank_has_joined():
    r, n = hvd.rank(), hvd.size()
    if n == 1:
        assert hvd.join() == 0
        return
    if r == n - 1:
        last = hvd.join()  # waits through the refused calls below
        assert hvd.allgather_object(last) == [last] * n
        return
    for call in (lambda: hvd.allgather(torch.ones(1, 2), name="g"),
                 lambda: hvd.broadcast(torch.ones(2), 0, name="b"),
                 lambda: hvd.broadcast_object({"a": 1}, name="o")):
        with pytest.raises(hvd.HorovodInternalError, match=rf"rank\(s\) {n - 1} have joined"):
            call()
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum, name="still").item() == n - 1
    last = hvd.join()
    assert 0 <= last < n - 1 and hvd.allgather_object(last) == [last] * n
