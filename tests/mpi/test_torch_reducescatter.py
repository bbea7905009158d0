"""hpcaccel.torch's reducescatter family against Horovod 0.28.1's semantics, on real MPI:
values against a reference built from every rank's input, Horovod's split of an uneven
first dimension, Sum and Average, pre/postscale, async handles, grouped calls, 16-bit
floats, gradients, ranks that disagree and what is refused. Assertions in terms of the
world size, so they hold at any rank count."""
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


def share(rows, rank, size):
    """(start, count) of `rank`'s rows: Horovod gives the first rows % size ranks one more."""
    counts = [rows // size + (1 if r < rows % size else 0) for r in range(size)]
    return sum(counts[:rank]), counts[rank]


def rank_input(k, rows, dtype, cols=3):
    """Rank k's input: small integers (exact in every dtype, sums too), different per rank."""
    g = torch.Generator().manual_seed(1000 + k)
    return torch.randint(0, 8, (rows, cols), generator=g).to(dtype)


def reference(rows, dtype, op, me, size, pre=1.0, post=1.0, cols=3):
    """This rank's expected output, from every rank's input, in float64."""
    total = sum(rank_input(k, rows, dtype, cols).double() * pre for k in range(size))
    start, count = share(rows, me, size)
    mine = total[start:start + count]
    if op == hvd.Average:
        post = post / size
    return mine * post


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_and_average_every_dtype_against_every_ranks_input(dtype):
    r, n = ranks()
    for rows in (4 * n, 2 * n + 1):
        x = rank_input(r, rows, dtype)
        kept = x.clone()
        for op in (hvd.Sum, hvd.Average):
            out = hvd.reducescatter(x, op=op)
            start, count = share(rows, r, n)
            assert out.dtype == dtype and out.shape == (count, 3)
            expect = reference(rows, dtype, op, r, n)
            if not dtype.is_floating_point:
                expect = expect.trunc()  # Average of integers truncates, as Horovod's
            tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
            assert torch.allclose(out.double(), expect, rtol=tol, atol=tol), (op, rows)
        assert torch.equal(x, kept)  # out of place: the input is untouched
    assert hvd.reducescatter(x).shape[0] == share(x.shape[0], r, n)[1]  # default op: Average


def test_uneven_first_dimension_follows_horovods_split():
    """Fewer rows than ranks (the last ranks get none), a remainder, none at all."""
    r, n = ranks()
    for rows in sorted({0, 1, max(n - 1, 1), n + 1, 3 * n - 1}):
        x = rank_input(r, rows, torch.float64, cols=2)
        out = hvd.reducescatter(x, op=hvd.Sum)
        start, count = share(rows, r, n)
        assert out.shape == (count, 2), rows
        assert torch.equal(out, reference(rows, torch.float64, hvd.Sum, r, n, cols=2)), rows
    counts = hvd.allgather_object(hvd.reducescatter(torch.ones(n + 1, 1)).shape[0])
    assert counts == [2] + [1] * (n - 1)  # the extra row goes to rank 0
    out = hvd.reducescatter(torch.ones(2 * n, 2, 3), op=hvd.Sum)  # more dimensions
    assert out.shape == (2, 2, 3) and torch.all(out == n)
    nc = torch.arange(3.0 * (2 * n + 1)).view(3, 2 * n + 1).t() + r  # not contiguous
    assert torch.equal(hvd.reducescatter(nc, op=hvd.Sum), hvd.reducescatter(nc.contiguous(), op=hvd.Sum))


def test_prescale_and_postscale():
    r, n = ranks()
    rows = 2 * n + 1
    for dtype in (torch.float32, torch.float64, torch.float16, torch.int32):
        x = rank_input(r, rows, dtype)
        for op in (hvd.Sum, hvd.Average):
            out = hvd.reducescatter(x, op=op, prescale_factor=2.0, postscale_factor=0.5)
            expect = reference(rows, dtype, op, r, n, pre=2.0, post=0.5)
            if not dtype.is_floating_point:
                expect = expect.trunc()
            assert torch.allclose(out.double(), expect, rtol=1e-3, atol=1e-3), (dtype, op)
    x = torch.full((n, 1), float(r + 1))
    out = hvd.reducescatter(x, op=hvd.Sum, prescale_factor=3.0, postscale_factor=0.25)
    assert out.item() == pytest.approx(3 * 0.25 * n * (n + 1) / 2)


def test_async_handles():
    r, n = ranks()
    rows = 3 * n + 2
    xs = [rank_input(r, rows, torch.float32) + i for i in range(6)]
    handles = [hvd.reducescatter_async(x, name=f"rs.{i}", op=hvd.Sum) for i, x in enumerate(xs)]
    outs = [hvd.synchronize(h) for h in handles]
    for i, out in enumerate(outs):
        assert torch.allclose(out.double(), reference(rows, torch.float32, hvd.Sum, r, n) + n * i)
    assert all(hvd.poll(h) for h in handles)
    assert hvd.synchronize(handles[0]) is None  # as Horovod: an unknown handle gives None
    avg = hvd.synchronize(hvd.reducescatter_async(torch.full((n, 2), float(r))))
    assert torch.allclose(avg, torch.full((1, 2), (n - 1) / 2))  # default op: Average


def test_grouped_matches_one_call_per_tensor():
    r, n = ranks()
    ts = [rank_input(r, 2 * n + 1, torch.float32), rank_input(r, n, torch.int64, cols=1),
          rank_input(r, max(n - 1, 1), torch.float32, cols=4), rank_input(r, n + 1, torch.float16)]
    for op in (hvd.Sum, hvd.Average):
        grouped = hvd.grouped_reducescatter(ts, op=op, prescale_factor=2.0)
        single = [hvd.reducescatter(t, op=op, prescale_factor=2.0) for t in ts]
        assert [g.dtype for g in grouped] == [t.dtype for t in ts]
        for g, s in zip(grouped, single):
            assert torch.equal(g, s)
    grouped = hvd.synchronize(hvd.grouped_reducescatter_async(ts, op=hvd.Sum))
    assert isinstance(grouped, list) and len(grouped) == len(ts)
    for g, t in zip(grouped, ts):
        assert torch.equal(g, hvd.reducescatter(t, op=hvd.Sum))
    assert grouped[0].data_ptr() != grouped[2].data_ptr()  # separate tensors, not one buffer


def test_half_precision_and_compression():
    r, n = ranks()
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.full((2 * n, 5), 0.5 * (r + 1)).to(dtype)
        out = hvd.reducescatter(x, op=hvd.Sum)
        assert out.dtype == dtype and torch.all(out.float() == 0.5 * n * (n + 1) / 2)
    x = torch.full((n, 5), (r + 1) / 3, dtype=torch.float32)
    for compression in (hvd.Compression.fp16, hvd.Compression.bf16):
        out = hvd.reducescatter(x, op=hvd.Sum, compression=compression)
        assert out.dtype == torch.float32 and out.shape == (1, 5)
        assert torch.allclose(out, torch.full((1, 5), n * (n + 1) / 6), rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_gradient_is_horovods_allgather(dtype):
    """Horovod's backward: allgather of the gradient, times size under Sum, times both
    factors. Each rank weights its share by rank+1, so every input row's gradient says
    which rank owns it."""
    r, n = ranks()
    rows = 2 * n + 1
    owner = torch.tensor([k for k in range(n) for _ in range(share(rows, k, n)[1])], dtype=torch.float64)
    for op, pre, post in ((hvd.Sum, 1.0, 1.0), (hvd.Average, 1.0, 1.0), (hvd.Sum, 2.0, 0.5)):
        x = rank_input(r, rows, dtype).requires_grad_()
        out = hvd.reducescatter(x, op=op, prescale_factor=pre, postscale_factor=post)
        out.backward(torch.full_like(out, r + 1))
        scale = (n if op == hvd.Sum else 1) * pre * post
        expect = ((owner + 1) * scale).unsqueeze(1).expand(rows, 3)
        assert torch.allclose(x.grad.double(), expect), (op, pre, post)
    a = torch.ones(n, 2, dtype=dtype, requires_grad=True)
    b = torch.ones(n + 1, dtype=dtype, requires_grad=True)
    outs = hvd.grouped_reducescatter([a, b], op=hvd.Sum)
    sum(o.sum() for o in outs).backward()
    assert torch.all(a.grad == n) and torch.all(b.grad == n)


@pytest.mark.parametrize("what", ["shape", "first-dim", "dtype", "op", "factor", "kind", "grouped"])
def test_ranks_that_disagree_all_get_an_error(what):
    r, n = ranks()
    if n == 1:
        pytest.skip("disagreement needs two ranks")
    odd = r == n - 1
    calls = {
        "shape": lambda: hvd.reducescatter(torch.ones(n, 3 if odd else 2)),
        "first-dim": lambda: hvd.reducescatter(torch.ones(n + 1 if odd else n, 2)),
        "dtype": lambda: hvd.reducescatter(torch.ones(n, dtype=torch.float64 if odd else torch.float32)),
        "op": lambda: hvd.reducescatter(torch.ones(n), op=hvd.Average if odd else hvd.Sum),
        "factor": lambda: hvd.reducescatter(torch.ones(n), prescale_factor=2.0 if odd else 1.0),
        "kind": lambda: (hvd.allreduce(torch.ones(n)) if odd else hvd.reducescatter(torch.ones(n))),
        "grouped": lambda: hvd.grouped_reducescatter(
            [torch.ones(n), torch.ones(n, 2 if odd else 1)]),
    }
    with pytest.raises(hvd.HorovodInternalError, match="disagree") as info:
        calls[what]()
    assert f"rank(s) {n - 1}" in str(info.value)
    assert hvd.reducescatter(torch.ones(n), op=hvd.Sum).tolist() == [n]  # in step again


def test_what_horovod_refuses():
    r, n = ranks()
    with pytest.raises(ValueError, match="0-d"):
        hvd.reducescatter(torch.tensor(float(r)))
    with pytest.raises(ValueError, match="0-d"):
        hvd.grouped_reducescatter_async([torch.ones(n), torch.tensor(1.0)])
    for op in (hvd.Min, hvd.Max, hvd.Product, hvd.Adasum):
        with pytest.raises(hvd.HorovodInternalError, match="Average and op=hvd.Sum"):
            hvd.reducescatter(torch.ones(n), op=op)
        with pytest.raises(RuntimeError):  # what Horovod's own tests catch
            hvd.reducescatter_async(torch.ones(n), op=op)
    with pytest.raises(ValueError, match="not supported"):
        hvd.reducescatter(torch.ones(n, dtype=torch.complex64))
    with pytest.raises(NotImplementedError, match="instead"):
        hvd.reducescatter(torch.ones(n), process_set=hvd.ProcessSet([0]))
    flags = torch.tensor([r == 0] * n)
    assert hvd.reducescatter(flags, op=hvd.Sum).tolist() == [True]  # bool: logical or
    with pytest.raises(hvd.HorovodInternalError, match="bool"):
        hvd.reducescatter(flags)  # Average of bool, refused on every rank
    assert hvd.reducescatter(torch.ones(n), op=hvd.Sum).tolist() == [n]  # still in step
