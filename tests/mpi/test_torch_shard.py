"""hvd.DistributedOptimizer(shard="optimizer" | "gradients") on real MPI: 30 steps of a small
model on each rank's own data give the parameters of the same script with shard="none" (sgd
with momentum and AdamW, with and without optimizer.clip_grad_norm_), a rank holds 1/size of
the optimizer state, state_dict() on rank 0 is the unsharded one and load_state_dict() takes
it back, module= changes when the parameters are waited for and nothing else, a Job
checkpoints and resumes exactly, and the refusals. Assertions are in terms of world size."""
import pytest
import torch
from torch import nn

import hpcaccel.torch as hvd
from dp_helpers import assert_same_on_every_rank, make_test_optimizer, rank_batch
from hpcaccel import checkpoint
from hpcaccel.torch.optimizer import DistributedOptimizer

pytestmark = pytest.mark.mpi(min_size=2)

STEPS = 30
TOL = dict(rtol=1e-6, atol=1e-7)


@pytest.fixture(autouse=True, scope="module")
def initialized():
    hvd.init()
    yield
    hvd.shutdown()


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch):
    """Several buckets, parameters split across the ranks' parts at any world size."""
    monkeypatch.setenv("HOROVOD_FUSION_THRESHOLD", "1024")


def world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


class Net(nn.Module):
    """Layers of uneven sizes, one frozen, one used on even steps only."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(10, 33)
        self.frozen = nn.Linear(33, 33)
        self.frozen.requires_grad_(False)
        self.b = nn.Linear(33, 4)
        self.sometimes = nn.Linear(10, 4)
        self.step = 0

    def forward(self, x):
        out = self.b(torch.tanh(self.frozen(torch.tanh(self.a(x)))))
        return out + self.sometimes(x) if self.step % 2 == 0 else out


def make(wrap, shard, optimizer="adamw", module=True, seed=0):
    model = Net(seed)
    opt = wrap(make_test_optimizer(optimizer, model), named_parameters=model.named_parameters(),
               shard=shard, module=model if module else None)
    return model, opt


def train(model, opt, steps, clip=0.0, first=0):
    for step in range(first, first + steps):
        x, y = rank_batch(world(), step)
        model.step = step
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if clip:
            opt.synchronize()
            opt.clip_grad_norm_(clip)
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
    opt.wait_parameters()


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def state_bytes(opt):
    sharded = opt._hvd_reducer.sharded
    if sharded is not None:
        return sharded.state_bytes()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t))


def assert_same_state(got, want, **tol):
    assert got["param_groups"] == want["param_groups"]
    assert sorted(got["state"]) == sorted(want["state"])
    for k, state in want["state"].items():
        assert sorted(got["state"][k]) == sorted(state), k
        for name, value in state.items():
            torch.testing.assert_close(got["state"][k][name], value, msg=f"{k}.{name}", **tol)


_unsharded = {}


def unsharded(wrap, optimizer, clip):
    """The shard="none" run's parameters, state bytes and state_dict() (cached)."""
    if (optimizer, clip) not in _unsharded:
        model, opt = make(wrap, "none", optimizer)
        train(model, opt, STEPS, clip)
        _unsharded[optimizer, clip] = params(model), state_bytes(opt), opt.state_dict()
    return _unsharded[optimizer, clip]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["no-clip", "clip"])
@pytest.mark.parametrize("shard", ["optimizer", "gradients"])
def test_sharded_script_equals_the_unsharded_one(wrap, optimizer, clip, shard):
    want, whole_bytes, whole_state = unsharded(wrap, optimizer, clip)
    model, opt = make(wrap, shard, optimizer)
    assert opt._hvd_reducer.sharded is not None
    train(model, opt, STEPS, clip)
    for a, b in zip(want, params(model)):
        torch.testing.assert_close(b, a, **TOL)
    assert_same_on_every_rank(world(), params(model))
    for p in model.parameters():
        assert p.grad is None  # each rank's part of the gradient is in its pieces only

    # a rank holds its share of the state: the moments or momentum split evenly, the
    # per-parameter step counts (AdamW) at most once per parameter part
    size = world().Get_size()
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert 0 < state_bytes(opt) <= whole_bytes / size + 8 * (trainable + size)

    state = opt.state_dict()  # collective
    if hvd.rank() == 0:
        assert_same_state(state, whole_state, **TOL)
    else:
        assert state["state"] == {} and state["param_groups"] == whole_state["param_groups"]

    # load_state_dict() on every rank: each keeps its part; the next state_dict() is it
    whole = hvd.broadcast_object(state, root_rank=0)
    other, again = make(wrap, shard, optimizer, seed=5)
    other.load_state_dict(model.state_dict())
    again.load_state_dict(whole)
    assert again.state == {}  # the pieces hold it
    assert state_bytes(again) == state_bytes(opt)
    back = again.state_dict()
    if hvd.rank() == 0:
        assert_same_state(back, whole, rtol=0, atol=0)
    # and both go on alike
    train(model, opt, 3, clip, first=STEPS)
    train(other, again, 3, clip, first=STEPS)
    for a, b in zip(params(model), params(other)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shard", ["optimizer", "gradients"])
def test_module_changes_when_parameters_are_awaited_not_the_result(wrap, shard):
    with_module, opt = make(wrap, shard, module=True)
    assert opt._hvd_reducer._forward_waits
    train(with_module, opt, 10, clip=0.05)
    without, opt = make(wrap, shard, module=False)
    assert not opt._hvd_reducer._forward_waits
    train(without, opt, 10, clip=0.05)
    for a, b in zip(params(with_module), params(without)):
        assert torch.equal(a, b)


def test_clip_grad_norm_unsharded_is_torchs(wrap):
    model, opt = make(wrap, "none", "sgd")
    x, y = rank_batch(world(), 0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.synchronize()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    total = torch.cat([g.flatten() for g in grads]).norm()
    norm = opt.clip_grad_norm_(1e-3)
    torch.testing.assert_close(norm, total)
    for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(p.grad, g * (1e-3 / (total + 1e-6)))
    with opt.skip_synchronize():
        opt.step()


def train_with_torch_recipe(model, opt, steps, clip, clip_fn=None):
    """Horovod's documented clipping recipe, torch.nn.utils.clip_grad_norm_ looked up at call
    time (as `torch.nn.utils.clip_grad_norm_(model.parameters(), c)` is written)."""
    norms = []
    for step in range(steps):
        x, y = rank_batch(world(), step)
        model.step = step
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.synchronize()
        norms.append(float((clip_fn or torch.nn.utils.clip_grad_norm_)(model.parameters(), clip)))
        with opt.skip_synchronize():
            opt.step()
    opt.wait_parameters()
    return norms


@pytest.mark.parametrize("shard", ["optimizer", "gradients"])
def test_horovods_clipping_recipe_clips_a_sharded_optimizer_by_the_global_norm(wrap, shard):
    model, opt = make(wrap, "none", "adamw")
    want_norms = train_with_torch_recipe(model, opt, 8, 0.05)
    want = params(model)
    model, opt = make(wrap, shard, "adamw")
    norms = train_with_torch_recipe(model, opt, 8, 0.05)
    assert min(norms) > 0.05  # every step clipped, by the whole gradient's norm
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(want_norms))
    for a, b in zip(want, params(model)):
        torch.testing.assert_close(b, a, **TOL)


def test_torchs_clipping_bound_early_fails_on_a_sharded_optimizer(wrap):
    from hpcaccel.torch import clipping

    bound_before = clipping._ORIGINAL.get("clip_grad_norm_", torch.nn.utils.clip_grad_norm_)
    model, opt = make(wrap, "optimizer")
    with pytest.raises(RuntimeError, match=r"optimizer\.clip_grad_norm_"):
        train_with_torch_recipe(model, opt, 1, 0.05, clip_fn=bound_before)
    with pytest.raises(RuntimeError, match="norm_type=1"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, norm_type=1)
    # parameters of no sharded optimizer: torch's function, unchanged
    plain = nn.Linear(3, 2)
    plain(torch.ones(1, 3)).sum().backward()
    want = torch.cat([p.grad.flatten() for p in plain.parameters()]).norm()
    torch.testing.assert_close(torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e9), want)


def test_refusals(wrap):
    model = Net()
    with pytest.raises(ValueError, match="shard='bogus'"):
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), shard="bogus")
    with pytest.raises(ValueError, match="powersgd"):
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), shard="optimizer",
                             compression=hvd.Compression.powersgd(2, 0))
    with pytest.raises(ValueError, match="trainable parameters must be the optimizer's"):
        DistributedOptimizer(torch.optim.SGD(model.b.parameters(), lr=0.1), shard="optimizer",
                             module=model)
    model, opt = make(wrap, "optimizer")
    x, y = rank_batch(world(), 0)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="synchronize"):
        opt.clip_grad_norm_(1.0)  # before synchronize(): not the reduced gradient
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
    opt.step()


def shared_dir(factory, name):
    from mpi4py import MPI
    path = str(factory.mktemp(name)) if hvd.rank() == 0 else None
    return MPI.COMM_WORLD.bcast(path)


def test_job_checkpoints_the_whole_state_and_resumes_sharded_or_not(wrap, tmp_path_factory):
    model, opt = make(wrap, "gradients")
    train(model, opt, 12)
    want = params(model)

    out = shared_dir(tmp_path_factory, "sharded-job")
    model, opt = make(wrap, "gradients")
    with hvd.Job(out, model, opt, epochs=1, stall_timeout=0) as job:
        job.resume()
        train(model, opt, 7)
        job.save(epoch=0, step=7)
    if hvd.rank() == 0:  # the whole state: every trainable parameter's
        saved = torch.load(checkpoint.list_checkpoints(out)[-1], weights_only=True)
        assert len(saved["optimizer"]["state"]) == sum(p.requires_grad for p in model.parameters())

    for shard in ("optimizer", "none"):  # a sharded run's checkpoint resumes either way
        model, opt = make(wrap, shard, seed=9)
        with hvd.Job(out, model, opt, epochs=1, stall_timeout=0) as job:
            start = job.resume()
            assert start.global_step == 0 and (start.epoch, start.step) == (0, 7)
            train(model, opt, 5, first=7)
        for a, b in zip(want, params(model)):
            torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("shard", ["optimizer", "gradients"])
def test_broadcast_optimizer_state_of_a_fresh_sharded_optimizer_is_horovods(wrap, shard):
    """Horovod's step on zero gradients (a step counted, weight decay applied) on each
    rank's part, and root's options everywhere: then training goes on as unsharded."""
    results = []
    for mode in ("none", shard):
        model, opt = make(wrap, mode)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        train(model, opt, 5)
        results.append(params(model))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL)
    # root's options reach every rank before that step, so all ranks step alike
    model, opt = make(wrap, shard)
    if world().Get_rank() == 0:
        opt.param_groups[0]["lr"] = 0.02
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.param_groups[0]["lr"] == 0.02
    train(model, opt, 2)
    assert_same_on_every_rank(world(), params(model))
