"""hvd.DistributedOptimizer (hpcaccel.torch) on real MPI, against Horovod 0.28.1's
semantics: the mean (or sum) over ranks of each rank's own gradient, predivide, gradient
accumulation counted per parameter, synchronize/skip_synchronize with clipping between,
parameters without gradients on some or all ranks, compression, Horovod's errors, and the
plain zero_grad/backward/step loop, on the DistributedOptimizer and on the Reducer itself.
The reference gradients are each rank's plain autograd (as on a one-rank communicator),
gathered with mpi4py. Assertions are in terms of the world size."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hpcaccel.torch as hvd
from dp_helpers import assert_same_on_every_rank, rank_batch, run_steps, small_net
from hpcaccel.comm import make_reducer
from hpcaccel.torch.optimizer import DistributedOptimizer

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(autouse=True, scope="module")
def initialized():
    hvd.init()
    yield
    hvd.shutdown()


def world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def local_grads(model, batches):
    """This rank's own gradients (plain autograd on a copy: no communication), summed over
    `batches` as backward passes accumulate them; None where a parameter got none."""
    ref = copy.deepcopy(model)
    for x, y in batches:
        loss_of(ref, x, y).backward()
    return [None if p.grad is None else p.grad.detach().clone() for p in ref.parameters()]


def over_ranks(grads, op="mean"):
    """Every rank's gradients combined in float64: a missing gradient counts as zeros, and
    stays None only if it is missing on every rank."""
    gathered = world().allgather([None if g is None else g.double().numpy() for g in grads])
    out = []
    for i, g in enumerate(grads):
        per_rank = [r[i] for r in gathered if r[i] is not None]
        if not per_rank:
            out.append(None)
            continue
        total = np.sum(per_rank, axis=0)
        out.append(torch.from_numpy(total / len(gathered) if op == "mean" else total).float())
    return out


def assert_grads(model, expect, rtol=1e-5, atol=1e-6):
    for (name, p), want in zip(model.named_parameters(), expect):
        if want is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, want, rtol=rtol, atol=atol, msg=name)


# -- the reduction --------------------------------------------------------------------------


@pytest.mark.parametrize("op, predivide, combine", [
    (hvd.Average, 1.0, "mean"), (hvd.Sum, 1.0, "sum"), (hvd.Average, 4.0, "mean"),
    (hvd.Average, 0.5, "mean")], ids=["average", "sum", "predivide-4", "predivide-0.5"])
def test_gradient_is_the_mean_or_sum_of_every_ranks_own_gradient(wrap, op, predivide, combine):
    model = small_net()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1),
               named_parameters=model.named_parameters(), op=op,
               gradient_predivide_factor=predivide)
    for step in range(3):  # buckets are reused: nothing may leak from one step into the next
        x, y = rank_batch(world(), step)
        expect = over_ranks(local_grads(model, [(x, y)]), combine)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.synchronize()
        assert_grads(model, expect)
        assert_same_on_every_rank(world(), [p.grad for p in model.parameters()])
        with opt.skip_synchronize():
            opt.step()
    assert_same_on_every_rank(world(), list(model.parameters()))


def test_backward_passes_per_step_accumulate_then_reduce_once(wrap):
    """Two passes per step equal one pass over both batches; each parameter's allreduce
    starts after its second backward only; a third raises (Horovod's AssertionError)."""
    model = small_net()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
               named_parameters=model.named_parameters(), backward_passes_per_step=2)
    reducer = opt._hvd_reducer
    for step in range(2):
        halves = [rank_batch(world(), 10 * step + k, n=4) for k in range(2)]
        expect = over_ranks(local_grads(model, halves))
        opt.zero_grad()
        loss_of(model, *halves[0]).backward()
        assert reducer._next_launch == 0  # nothing on the wire after the first pass
        with pytest.raises(AssertionError, match="not reduced yet"):
            opt.zero_grad()  # pending: Horovod refuses it too
        loss_of(model, *halves[1]).backward()
        assert reducer._next_launch == len(reducer.buckets)  # every bucket started
        opt.synchronize()
        assert_grads(model, expect)
        with opt.skip_synchronize():
            opt.step()

    opt.zero_grad()
    for k in range(2):
        loss_of(model, *rank_batch(world(), 100 + k)).backward()
    with pytest.raises(AssertionError, match="backward_passes_per_step=2"):
        loss_of(model, *rank_batch(world(), 102)).backward()
    opt.synchronize()  # every rank raised alike; the step's reductions still finish
    opt.set_backward_passes_per_step(1)
    assert opt.backward_passes_per_step == 1
    x, y = rank_batch(world(), 200)
    expect = over_ranks(local_grads(model, [(x, y)]))
    opt.zero_grad()
    loss_of(model, x, y).backward()
    with pytest.warns(UserWarning, match="skip_synchronize"):  # after that synchronize()
        opt.step()  # new gradients since: reduced (a vote tells every rank so)
    assert_grads(model, expect)


def test_clipping_between_synchronize_and_step(wrap):
    model = small_net()
    lr, max_norm = 0.5, 0.05
    opt = wrap(torch.optim.SGD(model.parameters(), lr=lr))
    x, y = rank_batch(world(), 0)
    mean = over_ranks(local_grads(model, [(x, y)]))
    scale = min(1.0, max_norm / (float(torch.cat([g.flatten() for g in mean]).norm()) + 1e-6))
    assert scale < 1.0  # the clip does something
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.synchronize()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning inside skip_synchronize
        with opt.skip_synchronize():
            opt.step()
    for p, p0, g in zip(model.parameters(), before, mean):
        torch.testing.assert_close(p.detach(), p0 - lr * scale * g, rtol=1e-5, atol=1e-6)
    assert_same_on_every_rank(world(), list(model.parameters()))


def test_step_after_synchronize_warns_and_reduces_nothing_twice(wrap):
    """Horovod warns; the gradients stay the sum (op Sum shows a second reduction)."""
    model = small_net()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Sum)
    x, y = rank_batch(world(), 0)
    expect = over_ranks(local_grads(model, [(x, y)]), "sum")
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.synchronize()
    opt.synchronize()  # again before step(): a vote, nothing new anywhere
    assert_grads(model, expect)
    with pytest.warns(UserWarning, match="skip_synchronize"):
        opt.step()
    assert_grads(model, expect)


def test_synchronize_step_warning_is_horovods():
    """Horovod 0.28.1's test_synchronize_step_warning, as it is: one warning, Horovod's text
    (scripts filter warnings on it)."""
    import torch.nn.functional as F
    x = torch.zeros(1, 1).requires_grad_()
    y = torch.ones(1, 1).requires_grad_()
    model = torch.nn.Linear(1, 1)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    loss = F.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.synchronize()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        optimizer.step()
    assert len(ws) == 1
    assert str(ws[0].message) == (
        "optimizer.step() called without optimizer.skip_synchronize() context after "
        "optimizer.synchronize(). This can cause training slowdown. You may want to "
        "consider using optimizer.skip_synchronize() context if you use "
        "optimizer.synchronize() in your code.")


class Branches(nn.Module):
    """`sometimes` is used on the ranks asked to; `never` on no rank."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Linear(10, 4)
        self.sometimes = nn.Linear(10, 4)
        self.never = nn.Linear(10, 4)

    def forward(self, x, use):
        return self.body(x) + self.sometimes(x) if use else self.body(x)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["to-none", "zeroed"])
def test_parameters_used_on_some_ranks_or_none(wrap, set_to_none):
    """Used on even ranks only: the mean counts zeros from the others (a zeroed .grad or
    none), no rank hangs. Used nowhere: .grad stays None, so momentum and weight decay
    leave the parameter where it is."""
    model = Branches()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
               named_parameters=model.named_parameters())
    never = [p.detach().clone() for p in model.never.parameters()]
    use = world().Get_rank() % 2 == 0
    for step in range(3):
        x, y = rank_batch(world(), step)
        ref = copy.deepcopy(model)
        nn.functional.cross_entropy(ref(x, use), y).backward()
        expect = over_ranks([None if p.grad is None else p.grad.clone() for p in ref.parameters()])
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(x, use), y).backward()
        opt.step()
        assert all(g is None for g in expect[-2:])  # `never`: no rank has a gradient
        assert_grads(model, expect)
    for p, p0 in zip(model.never.parameters(), never):
        assert torch.equal(p.detach(), p0)
    assert_same_on_every_rank(world(), list(model.parameters()))


def test_a_rank_without_any_backward_still_takes_part(wrap):
    model = small_net()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = rank_batch(world(), 0)
    mine = local_grads(model, [(x, y)]) if world().Get_rank() == 0 else [None] * 4
    expect = over_ranks(mine)
    opt.zero_grad()
    if world().Get_rank() == 0:
        loss_of(model, x, y).backward()
    opt.step()
    assert_grads(model, expect)


def test_horovod_fusion_threshold_sets_the_bucket_size(wrap, monkeypatch):
    monkeypatch.setenv("HOROVOD_FUSION_THRESHOLD", "512")
    model = small_net()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    reducer = opt._hvd_reducer
    assert reducer.bucket_bytes == 512 and len(reducer.buckets) > 1
    x, y = rank_batch(world(), 0)
    expect = over_ranks(local_grads(model, [(x, y)]))
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()
    assert_grads(model, expect)


def test_sparse_gradients_are_made_dense(wrap):
    torch.manual_seed(0)
    emb = nn.Embedding(20, 3, sparse=True)
    opt = wrap(torch.optim.SGD(emb.parameters(), lr=0.1), sparse_as_dense=False)
    rank = world().Get_rank()
    ids = torch.tensor([rank, rank + 1, 7])
    dense = torch.zeros(20, 3)
    for i in ids.tolist():
        dense[i] += 1.0
    expect = over_ranks([dense])[0]
    opt.zero_grad()
    emb(ids).sum().backward()
    opt.synchronize()
    assert not emb.weight.grad.is_sparse
    torch.testing.assert_close(emb.weight.grad, expect)


# -- compression ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_16_bit_compression_is_close_to_exact(wrap, name):
    model = small_net()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1),
               compression=getattr(hvd.Compression, name))
    assert opt._hvd_reducer.wire_dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
    x, y = rank_batch(world(), 0)
    expect = over_ranks(local_grads(model, [(x, y)]))
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.synchronize()
    for p, want in zip(model.parameters(), expect):
        tol = (2e-3 if name == "fp16" else 1.6e-2) * float(want.abs().max())
        torch.testing.assert_close(p.grad, want, rtol=0, atol=tol)
    assert_same_on_every_rank(world(), [p.grad for p in model.parameters()])


def test_powersgd_exact_first_then_compressed_and_identical(wrap):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.01),
               compression=hvd.Compression.powersgd(rank=2, start_step=1))
    assert opt._hvd_reducer.powersgd is not None and opt._hvd_reducer.powersgd.rank == 2
    g = torch.Generator().manual_seed(world().Get_rank())
    for step in range(3):
        x, y = torch.randn(8, 64, generator=g), torch.randint(0, 4, (8,), generator=g)
        expect = over_ranks(local_grads(model, [(x, y)]))
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.synchronize()
        if step == 0:  # start_step=1: the first step is exact
            assert_grads(model, expect)
        assert_same_on_every_rank(world(), [p.grad for p in model.parameters()])
        with opt.skip_synchronize():
            opt.step()


# -- the wrapped optimizer --------------------------------------------------------------------


def test_is_a_subclass_sharing_state_and_param_groups(wrap):
    model = small_net()
    base = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_of(model, *rank_batch(world(), 0)).backward()
    base.step()  # state exists before wrapping and must be kept
    exp_avg = base.state[model[0].weight]["exp_avg"]
    opt = wrap(base, named_parameters=model.named_parameters())
    assert isinstance(opt, torch.optim.Adam) and type(opt).__name__ == "Adam"
    assert type(opt) is type(wrap(torch.optim.Adam(small_net().parameters())))  # cached
    assert opt.state is base.state and opt.param_groups is base.param_groups
    assert opt.state[model[0].weight]["exp_avg"] is exp_avg
    assert opt.defaults == base.defaults and "Adam" in repr(opt)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    opt.zero_grad()
    loss_of(model, *rank_batch(world(), 1)).backward()
    opt.step()
    assert calls == [1]  # torch's step hooks run once
    assert int(opt.state[model[0].weight]["step"]) == 2
    with pytest.raises(ValueError, match="already"):
        DistributedOptimizer(opt)
    with pytest.raises(NotImplementedError, match="before wrapping"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_broadcast_optimizer_state_and_load_state_dict(wrap):
    model = small_net()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = wrap(torch.optim.Adam(model.parameters(), lr=0.01 * (1 + world().Get_rank())))
    hvd.broadcast_optimizer_state(opt, root_rank=0)  # a raw step of the wrapped optimizer
    assert opt.param_groups[0]["lr"] == 0.01
    saved = copy.deepcopy(opt.state_dict())
    for step in range(2):
        opt.zero_grad()
        loss_of(model, *rank_batch(world(), step)).backward()
        opt.step()
    assert_same_on_every_rank(world(), list(model.parameters()))
    if world().Get_rank() == 0:
        opt.load_state_dict(saved)  # local, as Horovod's
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert int(opt.state[model[0].weight]["step"]) == int(saved["state"][0]["step"])


def test_same_data_on_every_rank_trains_like_one_process(wrap):
    """Every rank the same batches: the mean is that batch's gradient, so N steps equal
    plain single-process training."""
    for make_opt in (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
                     lambda ps: torch.optim.Adam(ps, lr=0.01)):
        plain, dist = small_net(), small_net()
        plain_opt = make_opt(plain.parameters())
        opt = wrap(make_opt(dist.parameters()), named_parameters=dist.named_parameters())
        g = torch.Generator().manual_seed(7)
        for _ in range(5):
            x, y = torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g)
            for model, o in ((plain, plain_opt), (dist, opt)):
                o.zero_grad()
                loss_of(model, x, y).backward()
                o.step()
        for (name, a), b in zip(plain.named_parameters(), dist.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_one_rank_runtime_leaves_gradients_alone_even_with_adasum():
    """A one-rank world (COMM_SELF): nothing to combine; Adasum is accepted there as
    Horovod accepts it, and zero_grad never waits for anything."""
    from mpi4py import MPI

    hvd.shutdown()
    hvd.init(comm=MPI.COMM_SELF)
    try:
        model = small_net()
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Adasum)
        x, y = rank_batch(world(), 0)
        expect = local_grads(model, [(x, y)])
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.zero_grad(set_to_none=False)  # nothing pending at one rank
        loss_of(model, x, y).backward()
        opt.step()
        assert_grads(model, expect)
        opt._hvd_finalizer()
    finally:
        hvd.shutdown()
        hvd.init()


# -- Horovod's errors ---------------------------------------------------------------------------


def test_horovods_errors(wrap):
    model = small_net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    named = list(model.named_parameters())
    cases = [
        (dict(named_parameters=[named[0], ("0.weight", named[1][1])] + named[2:]), ValueError,
         "unique"),
        (dict(named_parameters=named[1:]), ValueError, "does not name"),
        (dict(named_parameters=[list(n) for n in named]), ValueError, "tuples"),
        (dict(op=hvd.Sum, gradient_predivide_factor=2.0), ValueError, "predivide"),
        (dict(backward_passes_per_step=0), ValueError, "backward_passes_per_step"),
        (dict(groups=0), ValueError, "groups"),
        (dict(groups=[[named[0][1], "x"]]), ValueError, "torch.Tensor"),
        (dict(groups=[[named[0][1]], [named[0][1]]]), ValueError, "once"),
        (dict(op=hvd.Adasum), NotImplementedError, r"op=hvd\.Average"),
        (dict(op=hvd.Min), NotImplementedError, "Min"),
        (dict(op=hvd.Product), NotImplementedError, "Product"),
        (dict(op=17), ValueError, "op must be"),
        (dict(process_set=hvd.ProcessSet([0])), NotImplementedError, "process sets"),
        (dict(compression=type("Mine", (hvd.Compression.none,), {})), ValueError, "your own"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            DistributedOptimizer(sgd, **kwargs)
    with pytest.warns(DeprecationWarning, match="groups"):  # deprecated, groups wins
        wrap(torch.optim.SGD(model.parameters(), lr=0.1), num_groups=2, groups=[[named[0][1]]])
    wrap(torch.optim.SGD(model.parameters(), lr=0.1), groups=2,  # accepted: buckets fuse
         named_parameters=named + [("extra", nn.Parameter(torch.zeros(1)))])


def test_ranks_wrapping_different_parameters_all_fail():
    width = 5 if world().Get_rank() == world().Get_size() - 1 else 4
    model = nn.Linear(3, width)
    with pytest.raises(ValueError, match=r"rank\(s\) \[" + str(world().Get_size() - 1)):
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))


def test_zero_grad_while_reducing_raises_then_step_works(wrap):
    model = small_net()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = rank_batch(world(), 0)
    expect = over_ranks(local_grads(model, [(x, y)]))
    opt.zero_grad()
    loss_of(model, x, y).backward()
    with pytest.raises(AssertionError, match="zero_grad"):
        opt.zero_grad()
    opt.synchronize()
    assert_grads(model, expect)
    with opt.skip_synchronize():
        opt.step()
    opt.zero_grad()  # fine once reduced


# -- the Reducer's own loop ---------------------------------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False], ids=["to-none", "zeroed"])
def test_plain_optimizer_loop_on_the_reducer(set_to_none):
    """optimizer.zero_grad(); backward; reducer.synchronize(); optimizer.step() at any world
    size gives bit for bit what the Reducer's own zero_grad gives (the CLI's loop)."""
    comm = world()
    reference = small_net()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    run_steps(make_reducer("mpi", comm=comm), reference, ref_opt, comm, 3)

    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    red = make_reducer("mpi", comm=comm)
    try:
        red.broadcast_parameters(model)
        red.attach(model, opt)
        for step in range(3):
            x, y = rank_batch(comm, step)
            opt.zero_grad(set_to_none=set_to_none)
            loss_of(model, x, y).backward()
            red.synchronize()
            opt.step()
        opt.zero_grad()
        loss_of(model, x, y).backward()
        with pytest.raises(RuntimeError, match="twice in one step"):
            loss_of(model, x, y).backward()
        red.synchronize()
    finally:
        red.close()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
