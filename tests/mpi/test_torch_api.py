"""hpcaccel.torch against Horovod 0.28.1's documented semantics, on real MPI: basics,
collectives (sync, async, grouped), every dtype, autograd, objects, parameter and
optimizer-state broadcasts, ranks that disagree, and what is refused. Assertions in terms of
the world size, so they hold at any rank count."""
import math
import time

import pytest
import torch

import hpcaccel.torch as hvd

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
          torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(autouse=True, scope="module")
def initialized():
    hvd.init()
    yield
    hvd.shutdown()


def ranks():
    return hvd.rank(), hvd.size()


@pytest.mark.quick
def test_basics_match_mpi():
    from mpi4py import MPI

    r, n = ranks()
    assert (r, n) == (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())
    assert hvd.is_initialized()
    hvd.init()  # idempotent
    assert 0 <= hvd.local_rank() < hvd.local_size() <= n
    assert 0 <= hvd.cross_rank() < hvd.cross_size()
    if hvd.is_homogeneous():
        assert hvd.local_size() * hvd.cross_size() == n
    assert (hvd.Average, hvd.Sum, hvd.Adasum, hvd.Min, hvd.Max, hvd.Product) == (0, 1, 2, 3, 4, 5)
    assert hvd.mpi_built() and hvd.mpi_enabled() and not hvd.gloo_built() and hvd.nccl_built() == 0
    assert isinstance(hvd.mpi_threads_supported(), bool)


def test_init_on_a_communicator_and_a_rank_list_then_again():
    from mpi4py import MPI

    r, n = ranks()
    hvd.shutdown()
    with pytest.raises(ValueError, match="not been initialized"):
        hvd.size()
    half = MPI.COMM_WORLD.Split(color=r % 2, key=r)
    hvd.init(comm=half)
    assert hvd.size() == half.Get_size() and hvd.rank() == half.Get_rank()
    assert hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum).item() == half.Get_size()
    hvd.shutdown()
    half.Free()
    hvd.init(comm=list(range(n)))
    assert (hvd.rank(), hvd.size()) == (r, n)
    hvd.shutdown()
    hvd.init()
    assert (hvd.rank(), hvd.size()) == (r, n)


@pytest.mark.quick
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_allreduce_every_dtype_and_op(dtype):
    r, n = ranks()
    x = torch.full((3, 2), r + 1).to(dtype)
    expect = {hvd.Sum: n * (n + 1) / 2, hvd.Min: 1, hvd.Max: n, hvd.Product: math.factorial(n)}
    for op, value in expect.items():
        out = hvd.allreduce(x, op=op)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.all(out.double() == value), (op, out)
    assert torch.all(x == r + 1)  # out of place: the input is untouched
    avg = hvd.allreduce(x)  # default op: Average
    if dtype.is_floating_point:
        assert torch.allclose(avg.double(), torch.full((3, 2), (n + 1) / 2, dtype=torch.float64))
    else:
        assert torch.all(avg.double() == math.trunc((n + 1) / 2))


def test_allreduce_bool_and_unsupported_types():
    r, n = ranks()
    flags = torch.tensor([r == 0, True, False])
    assert hvd.allreduce(flags, op=hvd.Max).tolist() == [True, True, False]
    assert hvd.allreduce(flags, op=hvd.Min).tolist() == [n == 1, True, False]
    with pytest.raises(ValueError, match="not supported"):
        hvd.allreduce(torch.zeros(2, dtype=torch.complex64))


def test_allreduce_in_place_zero_d_scales_and_average_argument():
    r, n = ranks()
    t = torch.tensor(float(r))
    assert hvd.allreduce_(t, name="zero-d") is t
    assert t.item() == pytest.approx((n - 1) / 2) and t.dim() == 0
    x = torch.full((4,), float(r + 1))
    out = hvd.allreduce(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.25)
    assert torch.allclose(out, torch.full((4,), n * (n + 1) / 2 * 0.5))
    with pytest.warns(DeprecationWarning):
        assert hvd.allreduce(x, average=False)[0].item() == n * (n + 1) / 2
    with pytest.raises(ValueError, match="supersedes"):
        hvd.allreduce(x, average=True, op=hvd.Sum)
    # Horovod's positional order of allreduce_: (tensor, average, name, op)
    y = torch.ones(2)
    hvd.allreduce_(y, None, "positional", hvd.Sum)
    assert y.tolist() == [n, n]
    nc = torch.arange(6.0).view(2, 3).t()  # not contiguous: goes through a copy, in place
    hvd.allreduce_(nc, op=hvd.Sum)
    assert torch.equal(nc, torch.arange(6.0).view(2, 3).t() * n)


def test_grouped_allreduce_mixed_dtypes():
    r, n = ranks()
    ts = [torch.full((2,), float(r)), torch.full((3, 1), r, dtype=torch.int64), torch.tensor(1.0)]
    out = hvd.grouped_allreduce(ts, op=hvd.Sum)
    assert [o.dtype for o in out] == [t.dtype for t in ts]
    assert out[0].tolist() == [n * (n - 1) / 2] * 2 and out[1].flatten().tolist() == [n * (n - 1) / 2] * 3
    assert out[2].item() == n
    hvd.grouped_allreduce_(ts, op=hvd.Max)
    assert ts[0].tolist() == [n - 1] * 2
    h = hvd.grouped_allreduce_async(ts, op=hvd.Min)
    assert [o.tolist() for o in hvd.synchronize(h)][0] == [n - 1] * 2  # inputs were maxed


@pytest.mark.quick
def test_async_runs_in_the_background():
    """While rank 0 holds the operation back, the others' async call returns at once and
    their poll() says not done; all finish once rank 0 submits."""
    r, n = ranks()
    if r == 0:
        time.sleep(1.0)
    t0 = time.perf_counter()
    h = hvd.allreduce_async(torch.ones(1000), op=hvd.Sum)
    submitted = time.perf_counter() - t0
    if r != 0:
        assert submitted < 0.2 and (n == 1 or hvd.poll(h) is False)
    assert hvd.synchronize(h)[0].item() == n
    assert hvd.poll(h)  # an already synchronized handle counts as done
    assert hvd.synchronize(h) is None  # as Horovod: unknown handles give None
    handles = [hvd.allreduce_async_(torch.full((10,), float(i)), name=f"many.{i}") for i in range(20)]
    assert [hvd.synchronize(h)[0].item() for h in handles] == [i * 1.0 for i in range(20)]


def test_allgather_uneven_first_dimension():
    r, n = ranks()
    for dtype in DTYPES + [torch.bool]:
        x = torch.full((r + 1, 2), r).to(dtype)
        out = hvd.allgather(x)
        assert out.shape == (n * (n + 1) // 2, 2) and out.dtype == dtype
        expect = torch.cat([torch.full((k + 1, 2), k) for k in range(n)]).to(dtype)
        assert torch.equal(out, expect), dtype
    empty = hvd.allgather(torch.zeros((0 if r == 0 else 1), 3))
    assert empty.shape == (n - 1, 3)
    outs = hvd.grouped_allgather([torch.full((r + 1,), r), torch.full((1, 2), float(r))])
    assert outs[0].tolist() == [k for k in range(n) for _ in range(k + 1)]
    assert outs[1].shape == (n, 2)
    assert torch.equal(hvd.synchronize(hvd.allgather_async(torch.tensor([r]))), torch.arange(n))


def test_broadcast_in_and_out_of_place():
    r, n = ranks()
    root = n - 1
    for dtype in DTYPES + [torch.bool]:
        x = torch.full((2, 3), r % 2).to(dtype)
        out = hvd.broadcast(x, root)
        assert torch.equal(out, torch.full((2, 3), root % 2).to(dtype))
        assert torch.equal(x, torch.full((2, 3), r % 2).to(dtype))
    y = torch.tensor(float(r))
    assert hvd.broadcast_(y, root, name="scalar") is y and y.item() == root
    assert hvd.synchronize(hvd.broadcast_async(torch.tensor([r]), 0)).item() == 0
    with pytest.raises(ValueError, match="root_rank"):
        hvd.broadcast(x, n)


def test_autograd_as_horovod_defines_it():
    r, n = ranks()
    x = torch.ones(3, requires_grad=True)
    hvd.allreduce(x * (r + 1), op=hvd.Sum).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), float(n * (r + 1))))  # d/dx: sum of ones, times r+1
    x = torch.ones(r + 1, 2, requires_grad=True)
    g = hvd.allgather(x)
    (g * torch.arange(g.shape[0]).unsqueeze(1)).sum().backward()
    offset = r * (r + 1) // 2
    assert torch.allclose(x.grad, torch.arange(offset, offset + r + 1).float().unsqueeze(1).expand(r + 1, 2))
    x = torch.ones(2, requires_grad=True)
    (hvd.broadcast(x, 0) * (r + 1)).sum().backward()
    assert torch.allclose(x.grad, torch.full((2,), (n + 1) / 2 if r == 0 else 0.0))
    a, b = torch.ones(2, requires_grad=True), torch.ones(1, requires_grad=True)
    sum(t.sum() for t in hvd.grouped_allreduce([a, b], op=hvd.Sum)).backward()
    assert a.grad.tolist() == [n, n] and b.grad.tolist() == [n]


@pytest.mark.quick
@pytest.mark.parametrize("call", ["shape", "dtype", "op", "root", "kind", "name", "allgather"])
def test_ranks_that_disagree_all_get_an_error(call):
    """Every rank raises HorovodInternalError naming what differs; none hangs; the next
    collective works again."""
    r, n = ranks()
    odd = r == n - 1 and n > 1
    calls = {
        "shape": lambda: hvd.allreduce(torch.ones(3 if odd else 2)),
        "dtype": lambda: hvd.allreduce(torch.ones(2, dtype=torch.float64 if odd else torch.float32)),
        "op": lambda: hvd.allreduce(torch.ones(2), op=hvd.Max if odd else hvd.Sum),
        "root": lambda: hvd.broadcast(torch.ones(2), 1 if odd else 0),
        "kind": lambda: (hvd.broadcast(torch.ones(2), 0) if odd else hvd.allreduce(torch.ones(2))),
        "name": lambda: hvd.allreduce(torch.ones(2), name="b" if odd else "a"),
        "allgather": lambda: hvd.allgather(torch.ones(2, 3 if odd else 2)),
    }
    if n == 1:
        pytest.skip("disagreement needs two ranks")
    with pytest.raises(hvd.HorovodInternalError, match="disagree") as info:
        calls[call]()
    assert f"rank(s) {n - 1}" in str(info.value)
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == n


def test_objects_and_parameters():
    r, n = ranks()
    assert hvd.broadcast_object({"rank": r, "f": [1, 2]}, root_rank=n - 1) == {"rank": n - 1, "f": [1, 2]}
    assert hvd.broadcast_object(None if r else (lambda v: v + 1))(1) == 2  # cloudpickle or pickle
    assert hvd.allgather_object({"r": r}) == [{"r": k} for k in range(n)]
    torch.manual_seed(r)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    mine = torch.cat([p.flatten() for p in model.state_dict().values() if p.dtype.is_floating_point])
    assert torch.equal(hvd.broadcast(mine, 0), mine)
    hvd.broadcast_parameters(list(model.named_parameters()), root_rank=0)
    with pytest.raises(ValueError, match="invalid params"):
        hvd.broadcast_parameters(model.parameters(), 0)


def test_broadcast_optimizer_state_of_a_fresh_and_a_used_optimizer():
    r, n = ranks()
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1 * (r + 1))
    hvd.broadcast_optimizer_state(opt, root_rank=0)  # empty state: made by one zero-gradient step
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert float(opt.state[p]["step"]) == 1.0 and torch.all(opt.state[p]["exp_avg"] == 0)
    assert torch.all(p.grad == 0) and torch.all(p.data == 1.0)
    p.grad = torch.full((3,), float(r + 1))
    opt.step()
    hvd.broadcast_optimizer_state(opt, root_rank=n - 1)
    assert torch.allclose(opt.state[p]["exp_avg"], torch.full((3,), 0.1 * n))
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.5, momentum=0.0)
    hvd.broadcast_optimizer_state(sgd, 0)  # stateless: nothing to broadcast, no error
    with pytest.raises(ValueError, match="LBFGS"):
        hvd.broadcast_optimizer_state(torch.optim.LBFGS([torch.nn.Parameter(torch.ones(1))]), 0)


def test_compression():
    r, n = ranks()
    x = torch.full((5,), 1.0 / 3 * (r + 1), dtype=torch.float32)
    for compression in (hvd.Compression.fp16, hvd.Compression.bf16):
        out = hvd.allreduce(x, op=hvd.Sum, compression=compression)
        assert out.dtype == torch.float32
        assert torch.allclose(out, torch.full((5,), n * (n + 1) / 6), rtol=1e-2)
    assert hvd.Compression.none.compress(x)[0] is x
    with pytest.raises(ValueError, match="DistributedOptimizer"):
        hvd.allreduce(x, compression=hvd.Compression.powersgd(2))


def test_barrier_and_what_is_not_supported():
    r, n = ranks()
    hvd.barrier()
    for call in (lambda: hvd.alltoall(torch.ones(2)),
                 lambda: hvd.SyncBatchNorm(3), lambda: hvd.elastic.run,
                 lambda: hvd.add_process_set([0]),
                 lambda: hvd.allreduce(torch.ones(1), process_set=hvd.ProcessSet([0]))):
        with pytest.raises(NotImplementedError, match="instead"):
            call()
    if n > 1:
        with pytest.raises(NotImplementedError, match="Average"):
            hvd.allreduce(torch.ones(2), op=hvd.Adasum)
    else:
        assert hvd.allreduce(torch.ones(2), op=hvd.Adasum).tolist() == [1.0, 1.0]
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == n  # still in step
