"""K steps with shuffling off at N ranks (G/N samples each) equal K steps at 1 rank with
the global batch G: data parallelism changes the speed, not the result."""
import numpy as np
import pytest
import torch

from hpcaccel.data import RankReader, write_file, open_dataset
from hpcaccel.models import build_model

pytestmark = pytest.mark.mpi(min_size=2)

GLOBAL_BATCH = 32
STEPS = 6


@pytest.fixture
def dataset(comm, tmp_path_factory):
    path = None
    if comm.Get_rank() == 0:
        rng = np.random.default_rng(3)
        n = GLOBAL_BATCH * STEPS + 5  # a remainder that must be skipped identically
        x = rng.standard_normal((n, 1, 6, 6)).astype(np.float32)
        y = rng.integers(0, 4, n)
        path = str(tmp_path_factory.mktemp("eq") / "data.h5")
        write_file(path, [x], [y], n, (1, 6, 6), 4, "test", chunk_rows=16)
    return open_dataset(comm.bcast(path))


def conv_no_batchnorm(shape, classes):
    # BatchNorm normalises each rank's own batch, which legitimately differs from one big
    # batch; equivalence holds for every layer without batch statistics.
    return torch.nn.Sequential(torch.nn.Conv2d(shape[0], 4, 3), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.LazyLinear(classes))


@pytest.mark.parametrize("model_name", ["mlp", "conv"])
def test_n_ranks_equal_one_rank(make, comm, dataset, model_name):
    rank, size = comm.Get_rank(), comm.Get_size()
    if GLOBAL_BATCH % size:
        pytest.skip(f"global batch {GLOBAL_BATCH} not divisible by {size} ranks")

    def model():
        torch.manual_seed(0)
        if model_name == "conv":
            net = conv_no_batchnorm(dataset.sample_shape, dataset.classes)
            net(torch.zeros(1, *dataset.sample_shape))  # materialise the lazy layer
            return net
        return build_model(model_name, dataset.sample_shape, dataset.classes)

    # reference: one process, global batch, computed on every rank independently
    ref = model()
    ref.train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for x, y in RankReader(dataset, 0, 1, GLOBAL_BATCH, shuffle=False, seed=0).epoch(0):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()

    # data parallel: G/size samples per rank
    dist = model()
    dist.train()
    opt = torch.optim.SGD(dist.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    red = make()
    red.broadcast_parameters(dist)
    red.attach(dist, opt)
    reader = RankReader(dataset, rank, size, GLOBAL_BATCH // size, shuffle=False, seed=0)
    assert reader.steps == STEPS
    for x, y in reader.epoch(0):
        red.zero_grad()
        torch.nn.functional.cross_entropy(dist(x), y).backward()
        red.synchronize()
        opt.step()
    red.close()

    for (name, a), b in zip(ref.state_dict().items(), dist.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} differs at {size} ranks")
