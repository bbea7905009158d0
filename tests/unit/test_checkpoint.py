"""What a start must match to continue a checkpoint (checkpoint.Requirements), checked
before anything is loaded; and what may change (hyperparameters). One process, real files
(the CLI at 2 ranks: tests/integration/test_run_ownership.py)."""
import pytest
import torch

from hpcaccel import checkpoint, optim, tasks
from hpcaccel.errors import UsageError


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def trained(name, model, **kw):
    """An optimizer of `name` (as --optimizer) over model, after one step (its state filled)."""
    opt = optim.build_optimizer(name, model, lr=0.1, momentum=kw.get("momentum", 0.9),
                                weight_decay=kw.get("weight_decay", 0.0))
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    return opt


def saved(tmp_path, model, opt, reducer=None):
    extra = {"reducer": reducer} if reducer is not None else None
    return checkpoint.save(str(tmp_path), checkpoint.build(model, opt, 1, 0, 8, [], extra), keep=2)


def requirements(model, opt, reducer_state=None, world_size=2):
    return checkpoint.requirements(model, opt, reducer_state or {}, world_size)


@pytest.mark.parametrize("theirs,mine", [("sgd", "adamw"), ("adamw", "sgd"), ("sgd", "lars")])
def test_another_optimizer_is_refused_before_loading_naming_both(tmp_path, theirs, mine):
    model = mlp()
    path = saved(tmp_path, model, trained(theirs, model))
    other = optim.build_optimizer(mine, model, lr=0.1, momentum=0.9, weight_decay=0.0)
    for check in (checkpoint.header, checkpoint.load):
        with pytest.raises(UsageError) as e:
            check(path, requirements(model, other))
        assert str(e.value).startswith(f"--optimizer {mine}: the checkpoint {path} was "
                                       f"trained with --optimizer {theirs}")
        assert "\n" not in str(e.value)
    state = checkpoint.load(path, requirements(model, trained(theirs, mlp())))  # the same: fine
    assert state["optimizer_name"] == theirs


def test_another_loss_or_task_is_refused_naming_both(tmp_path):
    """train_loss (and the metrics) must not change meaning in the middle of a run."""
    model = mlp()
    opt = trained("sgd", model)
    mse = tasks.Regress((4,), "mse")
    state = checkpoint.build(model, opt, 1, 0, 8, [], checkpoint.task_fields(mse))
    path = checkpoint.save(str(tmp_path), state, keep=2)
    for check in (checkpoint.header, checkpoint.load):
        with pytest.raises(UsageError) as e:
            check(path, checkpoint.requirements(model, opt, {}, 2, tasks.Regress((4,), "l1")))
        assert str(e.value) == (
            f"--loss l1: the checkpoint {path} was trained with --loss mse, and train_loss and "
            f"test_loss would change meaning mid-run; continue with --loss mse, or start a new "
            f"run from its weights (--init-from {path}, in a new --out)")
    with pytest.raises(UsageError, match=rf"^--task classify: the checkpoint {path} was trained "
                                         rf"with --task regress; continue with --task regress"):
        checkpoint.header(path, checkpoint.requirements(model, opt, {}, 2, tasks.Classify(4)))
    checkpoint.header(path, checkpoint.requirements(model, opt, {}, 2, mse))  # the same: fine
    checkpoint.header(path, checkpoint.requirements(model, opt, {}, 2))  # a script's: unchecked


def test_other_frozen_parameters_are_refused_naming_freeze(tmp_path):
    model = mlp()
    path = saved(tmp_path, model, trained("sgd", model))
    model[0].weight.requires_grad_(False)  # --freeze 0.weight now, nothing frozen then
    opt = optim.build_optimizer("sgd", model, lr=0.1, momentum=0.9, weight_decay=0.0)
    with pytest.raises(UsageError, match=r"^--freeze: the checkpoint .* was trained with 4 "
                                         r"trainable parameter tensors, this start has 3"):
        checkpoint.header(path, requirements(model, opt))


def test_powersgd_of_another_rank_is_refused_where_its_state_would_not_fit(tmp_path):
    model = mlp()
    opt = trained("sgd", model)
    ranks = [{"bucket_bytes": 1 << 20, "powersgd": {"step": 3, "rank": 4, "params": {
        0: {"error": torch.zeros(4, 32), "q": torch.zeros(32, 4)},
        2: {"error": torch.zeros(32, 16), "q": torch.zeros(16, 4)}}}} for _ in range(2)]
    path = saved(tmp_path, model, opt, ranks)
    same = {"powersgd": {"step": 0, "rank": 2, "params": {0: {}, 2: {}}}}
    checkpoint.header(path, requirements(model, opt, same))  # other rank, same matrices: Q anew
    fewer = {"powersgd": {"step": 0, "rank": 8, "params": {2: {}}}}
    with pytest.raises(UsageError, match=r"^--powersgd-rank 8: the checkpoint .* was trained "
                                         r"with --powersgd-rank 4, .* continue with "
                                         r"--powersgd-rank 4$"):
        checkpoint.header(path, requirements(model, opt, fewer))
    # another world size keeps only what all ranks share; no compression drops it: both go on
    checkpoint.header(path, requirements(model, opt, fewer, world_size=4))
    checkpoint.header(path, requirements(model, opt, {"bucket_bytes": 1 << 20}))


def test_a_checkpoint_without_the_optimizer_name_is_still_read(tmp_path):
    """Written before the name was recorded: nothing to compare it with."""
    model = mlp()
    state = checkpoint.build(model, trained("sgd", model), 1, 0, 8, [])
    del state["optimizer_name"]
    path = checkpoint.save(str(tmp_path), state, keep=2)
    other = optim.build_optimizer("sgd", model, lr=0.1, momentum=0.9, weight_decay=0.0)
    assert checkpoint.load(path, requirements(model, other))["global_step"] == 8


def test_loading_the_optimizer_keeps_this_starts_hyperparameters(tmp_path):
    model = mlp()
    before = trained("sgd", model, momentum=0.9, weight_decay=0.0)
    path = saved(tmp_path, model, before)
    now = optim.build_optimizer("sgd", model, lr=0.1, momentum=0.5, weight_decay=0.01)
    checkpoint.load_optimizer(now, checkpoint.load(path, requirements(model, now))["optimizer"])
    assert [g["momentum"] for g in now.param_groups] == [0.5, 0.5]
    assert [g["weight_decay"] for g in now.param_groups] == [0.01, 0.0]  # biases exempt
    for p in model.parameters():  # the state itself is the checkpoint's
        torch.testing.assert_close(now.state[p]["momentum_buffer"],
                                   before.state[p]["momentum_buffer"])
