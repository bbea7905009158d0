"""PowerSGD's algorithm on one process (the sum over ranks of one rank is the identity): exact
recovery at full rank, error feedback, warm start, checkpoint state. Across ranks:
tests/mpi/test_powersgd.py."""
import pytest
import torch

from hpcaccel.comm.powersgd import PowerSGD, compressible, orthogonalize_


def no_allreduce(t):
    """The sum over a one-rank world."""


def low_rank(n, m, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g)


@pytest.mark.parametrize("shape,rank,want", [
    ((10,), 1, False),                 # a bias
    ((512, 784), 4, True),
    ((4, 100), 4, False),              # (4 + 100) * 4 * 2 > 400: little to gain
    ((64, 32, 3, 3), 4, True),         # a conv kernel as 64 x 288
    ((8, 8), 4, False),
])
def test_compressible(shape, rank, want):
    assert compressible(shape, rank) is want


def test_orthogonalize_handles_rank_deficient_columns():
    p = torch.zeros(20, 4)
    p[:, 0] = torch.arange(20.0)
    p[:, 1] = p[:, 0]                  # repeated column, two zero columns
    orthogonalize_(p)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.t() @ p, torch.eye(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(40, 30), (16, 3, 5, 5)])
def test_rank_r_gradient_recovered_exactly_at_full_rank(shape):
    r = 3
    m = low_rank(shape[0], int(torch.tensor(shape[1:]).prod()), r, seed=1).view(shape)
    psgd = PowerSGD(world_size=1, rank=r)
    psgd.add_group([0], [shape])
    grad = m.clone()
    psgd.average_(0, [grad], no_allreduce)
    torch.testing.assert_close(grad, m, atol=1e-4, rtol=1e-4)
    # nothing left behind for error feedback
    assert psgd.state_dict()["params"][0]["error"].abs().max() < 1e-4


def test_low_rank_loses_information_without_error_feedback_applied_once():
    psgd = PowerSGD(world_size=1, rank=1)
    psgd.add_group([0], [(30, 20)])
    m = low_rank(30, 20, 4, seed=2)
    grad = m.clone()
    psgd.average_(0, [grad], no_allreduce)
    assert not torch.allclose(grad, m, atol=1e-2)  # rank 1 of a rank-4 matrix is lossy
    err = psgd.state_dict()["params"][0]["error"]
    torch.testing.assert_close(grad + err, m, atol=1e-5, rtol=1e-5)  # the residual is kept


def test_error_feedback_makes_the_accumulated_update_match_the_sum():
    """sum of applied updates + final error = sum of gradients (telescoping), and the error
    stays bounded, so the accumulated update approaches the uncompressed sum."""
    torch.manual_seed(0)
    psgd = PowerSGD(world_size=1, rank=1)
    psgd.add_group([0, 1], [(24, 32), (16, 2, 3, 3)])
    mean = [torch.randn(24, 32), torch.randn(16, 2, 3, 3)]
    applied = [torch.zeros_like(t, dtype=torch.float64) for t in mean]
    exact = [torch.zeros_like(t, dtype=torch.float64) for t in mean]
    rel = []
    for step in range(300):
        grads = [mu + 0.5 * torch.randn_like(mu) for mu in mean]
        for e, g in zip(exact, grads):
            e += g.double()
        psgd.average_(0, grads, no_allreduce)
        for a, g in zip(applied, grads):
            a += g.double()
        if step in (9, 299):
            rel.append(max(((a - e).norm() / e.norm()).item() for a, e in zip(applied, exact)))
    errors = [s["error"] for s in psgd.state_dict()["params"].values()]
    for a, e, err in zip(applied, exact, errors):
        torch.testing.assert_close(a + err.double().view_as(a), e, atol=1e-3, rtol=1e-4)
    assert rel[1] < 0.05, rel
    assert rel[1] < rel[0] / 5, rel  # error bounded, sums growing: the gap closes


def test_warm_start_converges_on_a_fixed_matrix():
    """Warm-started Q is one power-iteration step per call: the rank-1 approximation of a
    fixed gradient approaches its best rank-1 approximation."""
    u, _ = torch.linalg.qr(torch.randn(50, 3, generator=torch.Generator().manual_seed(3)))
    v, _ = torch.linalg.qr(torch.randn(40, 3, generator=torch.Generator().manual_seed(4)))
    m = u @ torch.diag(torch.tensor([4.0, 2.0, 1.0])) @ v.t()
    best = 4.0 * torch.outer(u[:, 0], v[:, 0])
    psgd = PowerSGD(world_size=1, rank=1)
    psgd.add_group([0], [(50, 40)])
    for _ in range(30):
        grad = m.clone()
        psgd.average_(0, [grad], no_allreduce)
        psgd.groups[0].error[0].zero_()  # no feedback: a plain power iteration on m
    torch.testing.assert_close(grad, best, atol=1e-4, rtol=1e-4)


def test_state_dict_round_trip_continues_identically():
    shapes = [(20, 30), (8, 4, 3, 3)]

    def fresh():
        p = PowerSGD(world_size=1, rank=2, start_step=1, seed=5)
        p.add_group([3, 7], shapes)
        return p

    def grads(step):
        g = torch.Generator().manual_seed(100 + step)
        return [torch.randn(s, generator=g) for s in shapes]

    a = fresh()
    for step in range(4):
        a.average_(0, grads(step), no_allreduce)
        a.end_step()
    b = fresh()
    b.load_state_dict(a.state_dict())
    assert b.step == 4 and b.active
    for step in range(4, 7):
        ga, gb = grads(step), grads(step)
        a.average_(0, ga, no_allreduce)
        b.average_(0, gb, no_allreduce)
        for x, y in zip(ga, gb):
            assert torch.equal(x, y)


def test_start_step_and_step_count():
    p = PowerSGD(world_size=2, rank=4, start_step=2)
    assert not p.active
    p.end_step()
    assert not p.active
    p.end_step()
    assert p.active


def test_skipped_matrix_keeps_its_error_and_q():
    p = PowerSGD(world_size=1, rank=1)
    p.add_group([0, 1], [(10, 12), (10, 12)], extra=2)
    g = [low_rank(10, 12, 3, seed=s) for s in (1, 2)]
    p.average_(0, [t.clone() for t in g], no_allreduce, extra=torch.ones(2))
    before = p.state_dict()["params"]
    summed = p.average_(0, [t.clone() for t in g], no_allreduce,
                        extra=torch.tensor([1.0, 0.0]), skip=lambda e: [bool(v == 0) for v in e])
    assert summed.tolist() == [1.0, 0.0]
    after = p.state_dict()["params"]
    assert torch.equal(after[1]["error"], before[1]["error"])
    assert torch.equal(after[1]["q"], before[1]["q"])
    assert not torch.equal(after[0]["error"], before[0]["error"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        PowerSGD(world_size=2, rank=0)
    with pytest.raises(ValueError, match="start_step"):
        PowerSGD(world_size=2, start_step=-1)
    p = PowerSGD(world_size=2)
    p.add_group([0], [(40, 40)])
    with pytest.raises(ValueError, match="twice"):
        p.add_group([0], [(40, 40)])


@pytest.mark.parametrize("argv,needle", [
    (["--powersgd-rank", "0"], "--powersgd-rank must be positive"),
    (["--powersgd-start-step", "-1"], "--powersgd-start-step must not be negative"),
])
def test_bad_flags_name_the_flag(argv, needle):
    from hpcaccel.config import parse_args
    from hpcaccel.errors import UsageError
    with pytest.raises(UsageError, match=needle):
        parse_args(["--compression", "powersgd", *argv])


def test_flags_reach_the_reducer_options():
    from hpcaccel.comm import reducer_options
    from hpcaccel.config import parse_args
    options = reducer_options(parse_args(["--compression", "powersgd", "--powersgd-rank", "2",
                                          "--powersgd-start-step", "50"]))
    assert (options["compression"], options["powersgd_rank"],
            options["powersgd_start_step"]) == ("powersgd", 2, 50)


def test_horovod_backend_refuses_powersgd_before_any_communication():
    from hpcaccel.comm import make_reducer
    from hpcaccel.errors import UsageError
    with pytest.raises(UsageError, match="--compression powersgd: only the mpi backend"):
        make_reducer("horovod", compression="powersgd")
