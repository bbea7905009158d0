"""BatchNorm statistics across ranks (hpcaccel/buffers.py): the ranks agree on one set of
buffers (the mean of the floating-point ones, rank 0's integer ones) before every evaluation
and every save, so the metrics a run reports are those of the model it saves, on both
backends; a mid-epoch checkpoint keeps each rank's own statistics for an exact resume."""
import numpy as np
import pytest
import torch
from torch import nn

from dp_helpers import fit_in_process
from hpcaccel import buffers, checkpoint, tasks
from hpcaccel.config import TrainConfig
from hpcaccel.control import ControlPlane
from hpcaccel.data import open_dataset, write_file
from hpcaccel.trainer import evaluate

pytestmark = pytest.mark.mpi(min_size=2)


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def gathered(comm, model):
    return comm.allgather({k: v.clone() for k, v in model.state_dict().items()})


def test_agree_averages_float_buffers_and_takes_rank_0s_integers(comm):
    control = ControlPlane(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    model = bn_net()
    bn = model[1]
    with torch.no_grad():  # every rank its own statistics, as after training on its samples
        bn.running_mean.copy_(torch.arange(4.0) * (rank + 1) / 3)
        bn.running_var.fill_(1.0 + rank)
        bn.num_batches_tracked.fill_(10 + rank)
    kept = buffers.RankBuffers(model, control)
    kept.trained()
    with kept.saving() as own:  # a checkpoint: the agreed buffers inside, own ones after
        assert torch.equal(own["1.running_var"], torch.full((4,), 1.0 + rank))
        inside = gathered(comm, model)
    assert torch.equal(bn.running_var, torch.full((4,), 1.0 + rank))
    kept.agree()
    every = gathered(comm, model)
    assert all(all(torch.equal(s[k], every[0][k]) for k in every[0]) for s in every)  # bitwise
    assert all(torch.equal(inside[r][k], every[r][k]) for r in range(size) for k in every[r])
    mean_scale = np.mean([r + 1 for r in range(size)]) / 3
    torch.testing.assert_close(bn.running_mean, torch.arange(4.0) * mean_scale)
    torch.testing.assert_close(bn.running_var, torch.full((4,), 1.0 + (size - 1) / 2))
    assert int(bn.num_batches_tracked) == 10  # rank 0's
    with kept.saving() as own:  # agreed already: nothing sent, nothing per rank
        assert own == {}


@pytest.fixture
def data(comm, tmp_path_factory):
    paths = None
    if comm.Get_rank() == 0:
        d = tmp_path_factory.mktemp("bn")
        rng = np.random.default_rng(0)
        paths = []
        for name, n in (("train", 96), ("test", 40)):
            x = rng.standard_normal((n, 1, 4, 4)).astype(np.float32)
            y = (x.reshape(n, -1).sum(1) > 0).astype(np.int64) + (x[:, 0, 0, 0] > 1)
            paths.append(str(d / f"{name}.h5"))
            write_file(paths[-1], [x], [y], n, (1, 4, 4), 3, "bn", chunk_rows=16)
    return [open_dataset(p) for p in comm.bcast(paths)]


def test_reported_metrics_are_the_saved_models(comm, backend, data, tmp_path_factory):
    """Trained with BatchNorm on each rank's own samples: after the run every rank holds
    the same model, its test metrics are those of the checkpoint's model evaluated alone,
    and a checkpoint taken mid-epoch holds each rank's own statistics besides."""
    from mpi4py import MPI

    train, test = data
    control = ControlPlane(comm)
    out = comm.bcast(str(tmp_path_factory.mktemp("out")))
    task = tasks.resolve("classify", train.target, "--data bn")
    model = bn_net()
    cfg = TrainConfig(epochs=1, batch_size=16 // comm.Get_size(), lr=0.1, out=out,
                      keep_checkpoints=5, checkpoint_every=3)  # 6 steps at any size
    records = fit_in_process(cfg, control, model, task, train, test, backend, shuffle=True)
    every = gathered(comm, model)
    for name in every[0]:
        assert all(torch.equal(s[name], every[0][name]) for s in every), name
    saved = checkpoint.list_checkpoints(out)
    end = torch.load(saved[-1], weights_only=True)
    assert all(torch.equal(end["model"][k], v) for k, v in model.state_dict().items())
    assert "buffers" not in end  # the epoch's end: the ranks hold the agreed ones
    alone = bn_net()
    alone.load_state_dict(end["model"])
    got = evaluate(alone, test, ControlPlane(MPI.COMM_SELF), 256, task=task)
    (record,) = records
    assert got["accuracy"] == record["test_accuracy"]
    assert got["loss"] == pytest.approx(record["test_loss"], rel=1e-6, abs=0)
    mid = torch.load(saved[0], weights_only=True)  # step 3 of 6: each rank's own kept
    assert mid["step_in_epoch"] == 3 and len(mid["buffers"]) == comm.Get_size()
    own = mid["buffers"]
    assert not torch.equal(own[0]["1.running_mean"], own[1]["1.running_mean"])
    torch.testing.assert_close(mid["model"]["1.running_mean"],
                               sum(o["1.running_mean"] for o in own) / len(own))
    restored = bn_net()
    restored.load_state_dict(mid["model"])
    buffers.restore_own(restored, mid["buffers"], comm.Get_rank(), comm.Get_size())
    assert torch.equal(restored[1].running_var, own[comm.Get_rank()]["1.running_var"])
