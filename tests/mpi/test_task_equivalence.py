"""Regress and segment, shuffling off: the Trainer at N ranks (G/N samples each) trains the
parameters of one rank with the global batch G, and its metrics (train and test, reduced as
sums over ranks) are the one rank's."""
import numpy as np
import pytest
import torch

from dp_helpers import fit_in_process
from hpcaccel import tasks
from hpcaccel.config import TrainConfig
from hpcaccel.control import ControlPlane
from hpcaccel.data import open_dataset, write_file
from hpcaccel.models import build_model

pytestmark = pytest.mark.mpi(min_size=2)

GLOBAL_BATCH = 24
STEPS = 5


def arrays(task_name, n, seed):
    rng = np.random.default_rng(seed)
    if task_name == "regress":  # three outputs, linear in x plus noise
        x = rng.standard_normal((n, 2, 4, 4)).astype(np.float32)
        w = np.random.default_rng(99).standard_normal((32, 3))
        y = (x.reshape(n, -1) @ w / 4 + 0.1 * rng.standard_normal((n, 3))).astype(np.float32)
        return x, y, 0
    x = rng.standard_normal((n, 1, 6, 6)).astype(np.float32)  # a class per pixel, from x
    y = np.digitize(x[:, 0], [-0.5, 0.5]).astype(np.int64)
    return x, y, 3


@pytest.fixture
def data(comm, tmp_path_factory, request):
    task_name = request.param
    paths = None
    if comm.Get_rank() == 0:
        d = tmp_path_factory.mktemp(task_name)
        paths = []
        for name, n, seed in (("train", GLOBAL_BATCH * STEPS + 5, 1), ("test", 37, 2)):
            x, y, classes = arrays(task_name, n, seed)
            paths.append(str(d / f"{name}.h5"))
            write_file(paths[-1], [x], [y], n, x.shape[1:], classes, "test", chunk_rows=16)
    train, test = comm.bcast(paths)
    return task_name, open_dataset(train), open_dataset(test)


def fit(comm, task_name, train, test, out):
    """Two epochs on `comm` with the global batch split over its ranks; (model, records)."""
    control = ControlPlane(comm)
    task = tasks.resolve(task_name, train.target, "--data test")
    torch.manual_seed(0)
    if task_name == "regress":
        model = build_model("mlp", train.sample_shape, task.output_shape)
    else:  # no BatchNorm: batch statistics legitimately differ between 1 and N ranks
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 3, 1))
    cfg = TrainConfig(epochs=2, batch_size=GLOBAL_BATCH // comm.Get_size(), shuffle=False,
                      lr=0.05, weight_decay=1e-3, out=str(out), keep_checkpoints=1)
    def steps_as_planned(reader):
        assert reader.steps == STEPS
    return model, fit_in_process(cfg, control, model, task, train, test,
                                 check_reader=steps_as_planned)


@pytest.mark.parametrize("data", ["regress", "segment"], indirect=True)
def test_n_ranks_equal_one_rank(comm, data, tmp_path_factory):
    from mpi4py import MPI

    task_name, train, test = data
    rank = comm.Get_rank()
    out = tmp_path_factory.mktemp("out")
    ref_model, ref = fit(MPI.COMM_SELF, task_name, train, test, out / f"one-{rank}")
    model, got = fit(comm, task_name, train, test, comm.bcast(str(out / "world")))
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} at {comm.Get_size()} ranks")
    assert len(got) == len(ref) == 2
    metric_keys = {"regress": {"train_rmse", "train_mae", "train_r2", "train_r2_per_output",
                               "test_rmse", "test_r2", "test_r2_per_output"},
                   "segment": {"train_pixel_accuracy", "train_mean_iou", "test_pixel_accuracy",
                               "test_mean_iou", "test_iou_per_class"}}[task_name]
    for mine, one in zip(got, ref):
        assert metric_keys <= set(one) and set(one) == set(mine)
        for key in sorted(k for k in one if k.startswith(("train_", "test_"))):
            np.testing.assert_allclose(mine[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)
    if task_name == "regress":
        assert got[-1]["test_r2"] > 0.2  # it learned something: the comparison means something
    else:
        assert got[-1]["test_pixel_accuracy"] > 0.5
