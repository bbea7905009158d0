"""hpcaccel's own calls for scripts (hpcaccel/torch/extras.py) at any world size: RankData
reads this rank's part (equal steps, every test sample once, resume at a step, staging),
Job checkpoints collectively, resumes exactly, agrees on a stop that reached one rank, and
refuses another run's output directory with one line and exit code 2."""
import os
import signal

import numpy as np
import pytest
import torch

import hpcaccel.torch as hvd
from hpcaccel import checkpoint
from hpcaccel.data import write_file, write_index

pytestmark = pytest.mark.mpi(min_size=1)


@pytest.fixture(autouse=True, scope="module")
def initialized():
    hvd.init()
    yield


def shared_dir(factory, name):
    """One directory for every rank (rank 0's)."""
    from mpi4py import MPI
    path = str(factory.mktemp(name)) if hvd.rank() == 0 else None
    return MPI.COMM_WORLD.bcast(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards of 48 samples; x holds each sample's index, so reads are checkable."""
    index = None
    if hvd.rank() == 0:
        d = tmp_path_factory.mktemp("shards")
        files = []
        for s in range(4):
            idx = np.arange(s * 48, (s + 1) * 48)
            path = str(d / f"part-{s}.h5")
            write_file(path, [idx[:, None].astype(np.float32)], [idx % 3], 48, (1,), 3, "t",
                       chunk_rows=8)
            files.append(path)
        index = write_index(str(d), files, [48] * 4, (1,), 3, "t")
    from mpi4py import MPI
    return MPI.COMM_WORLD.bcast(index)


def all_ranks(value):
    return hvd.allgather_object(value)


def test_rank_data_gives_every_rank_its_own_samples_in_equal_steps(shards):
    data = hvd.RankData(shards, batch_size=4, seed=1, test=shards)
    assert (data.samples, data.sample_shape, data.classes) == (192, (1,), 3)
    mine = [int(v) for x, _ in data.epoch(0) for v in x[:, 0]]
    assert len(mine) == data.steps * 4 and data.position == (1, 0)  # the loop ended
    every = all_ranks(mine)
    flat = [v for part in every for v in part]
    assert len(set(flat)) == len(flat)  # no sample read by two ranks in one epoch
    assert len(flat) == hvd.size() * data.steps * 4
    assert all_ranks(data.steps) == [data.steps] * hvd.size()
    again = [int(v) for x, _ in data.epoch(0) for v in x[:, 0]]
    assert again == mine  # the order is a function of (seed, epoch)
    seen = [int(v) for x, _ in data.test_batches(batch_size=5) for v in x[:, 0]]
    tested = sorted(v for part in all_ranks(seen) for v in part)
    assert tested == list(range(192))  # every test sample exactly once over the ranks


def test_rank_data_resumes_an_epoch_at_a_step(shards):
    data = hvd.RankData(shards, batch_size=4, seed=2)
    full = [x[:, 0].tolist() for x, _ in data.epoch(1)]
    data.resume_at(1, 3)
    tail = [x[:, 0].tolist() for x, _ in data.epoch(1)]
    assert tail == full[3:]
    assert [x[:, 0].tolist() for x, _ in data.epoch(1)] == full  # only once


def test_rank_data_stages_to_node_local_storage(shards, tmp_path_factory):
    stage = shared_dir(tmp_path_factory, "stage")
    plain = hvd.RankData(shards, batch_size=4, seed=3)
    staged = hvd.RankData(shards, batch_size=4, seed=3, epochs=2, stage_dir=stage)
    want = [x[:, 0].tolist() for x, _ in plain.epoch(0)]
    assert [x[:, 0].tolist() for x, _ in staged.epoch(0)] == want
    assert staged.staging is not None
    assert any(p.startswith(stage) for p in staged.dataset.files)
    # with a Job, resume() stages (before its watchdog starts), for the epochs left
    data = hvd.RankData(shards, batch_size=4, seed=3, epochs=2, stage_dir=stage)
    model, opt = model_and_optimizer()
    with hvd.Job(shared_dir(tmp_path_factory, "staged-job"), model, opt, data=data) as job:
        assert data.staging is None
        job.resume()
        assert data.staging is not None and data.staging["train_files_per_host_max"] >= 1
        assert [x[:, 0].tolist() for x, _ in data.epoch(0)] == want


def test_rank_data_with_too_few_samples_exits_2_on_every_rank(shards, capsys):
    with pytest.raises(SystemExit) as e:
        hvd.RankData(shards, batch_size=1000)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("fewer than ranks x batch_size" in err) == (hvd.rank() == 0)


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return model, opt


def train_steps(job, data, model, opt, epochs, stop_after=None):
    start = job.resume()
    for epoch in range(start.epoch, epochs):
        for x, y in data.epoch(epoch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if job.should_stop() or job.global_step == stop_after:
                return job.save({"note": "stopped"})
        job.save()
    return None


def test_job_saves_collectively_and_resumes_to_the_same_parameters(shards, tmp_path_factory):
    data = hvd.RankData(shards, batch_size=4, seed=4, epochs=2)
    model, opt = model_and_optimizer()
    with hvd.Job(shared_dir(tmp_path_factory, "full"), model, opt, data=data) as job:
        train_steps(job, data, model, opt, 2)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    out = shared_dir(tmp_path_factory, "part")
    data = hvd.RankData(shards, batch_size=4, seed=4, epochs=2)
    model, opt = model_and_optimizer()
    stop_at = data.steps + 2  # inside the second epoch
    with hvd.Job(out, model, opt, data=data) as job:
        path = train_steps(job, data, model, opt, 2, stop_after=stop_at)
        # rank 0 wrote it; every rank returns from save() only once the file is complete
        assert all_ranks(path)[0] is not None and os.path.exists(all_ranks(path)[0])
        assert (path is None) == (hvd.rank() != 0)

    data = hvd.RankData(shards, batch_size=4, seed=4, epochs=2)
    model, opt = model_and_optimizer(seed=99)  # other weights: the checkpoint's replace them
    with hvd.Job(out, model, opt, data=data) as job:
        start = job.resume()
        assert (start.epoch, start.step, start.global_step) == (1, 2, stop_at)
        assert start.state == {"note": "stopped"}
        train_steps_from = job.global_step
        for x, y in data.epoch(1):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            job.should_stop()
        assert job.global_step - train_steps_from == data.steps - 2
        job.save()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0, msg=name)
    saved = checkpoint.list_checkpoints(out)
    assert len(saved) == 2  # keep=2
    head = checkpoint.header(saved[-1])
    assert (head["epoch"], head["step_in_epoch"]) == (2, 0)  # an epoch's end: the next one


def test_a_stop_at_an_epochs_last_step_resumes_into_that_epochs_end(shards, tmp_path_factory):
    """Saved inside the loop at the epoch's last batch, the run resumes in that epoch with
    nothing left to read, so the code after the loop (metrics, evaluation) still runs."""
    out = shared_dir(tmp_path_factory, "last-step")
    data = hvd.RankData(shards, batch_size=4, seed=5, epochs=2)
    model, opt = model_and_optimizer()
    with hvd.Job(out, model, opt, data=data) as job:
        job.resume()
        for _ in data.epoch(0):
            job.should_stop()
            if data.position == (0, data.steps):
                job.save({"loss_sum": 1.5})
                break
    data = hvd.RankData(shards, batch_size=4, seed=5, epochs=2)
    model, opt = model_and_optimizer()
    with hvd.Job(out, model, opt, data=data) as job:
        start = job.resume()
        assert (start.epoch, start.step, start.state) == (0, data.steps, {"loss_sum": 1.5})
        assert list(data.epoch(0)) == [] and data.position == (1, 0)
        path = job.save()  # the epoch's end: the same step, the next epoch's start
        assert hvd.rank() != 0 or path.endswith(f"step-{data.steps:08d}.pt")
        assert checkpoint.header(checkpoint.list_checkpoints(out)[-1])["epoch"] == 1


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_step(shards, tmp_path_factory):
    model, opt = model_and_optimizer()
    with hvd.Job(shared_dir(tmp_path_factory, "stop"), model, opt, epochs=1) as job:
        job.resume()
        assert not job.should_stop()
        if hvd.rank() == hvd.size() - 1:
            job.stop.received = signal.SIGUSR1  # as the handler sets it
        assert job.should_stop()  # on every rank, at the same step
        assert all_ranks(job.global_step) == [2] * hvd.size()
        assert job.stop.name == "SIGUSR1"
        path = job.save(epoch=0, step=2)
        assert all_ranks(path)[0].endswith("step-00000002.pt")


def test_job_refuses_another_models_output_directory(tmp_path_factory, capsys):
    out = shared_dir(tmp_path_factory, "owned")
    model, opt = model_and_optimizer()
    with hvd.Job(out, model, opt, epochs=1) as job:
        job.resume()
        job.save(epoch=1, step=0)
    other = torch.nn.Linear(2, 2)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        hvd.Job(out, other, other_opt, epochs=1)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("different model" in err) == (hvd.rank() == 0), err
    # the remedies a script has: its Job's arguments, not the CLI's flags (rank 0's line,
    # checked on every rank, so that all fail alike and none waits in a later collective)
    (line,) = all_ranks(err.splitlines())[0]
    assert line.startswith(f"hpcaccel: error: out {out}: ") and "--" not in line, line
    assert "use a new out, or overwrite=True to move its outputs to" in line, line
    with hvd.Job(out, other, other_opt, epochs=1, overwrite=True):
        pass
    said = all_ranks(capsys.readouterr().out)[0]
    assert "hpcaccel: overwrite=True: moved the previous run's outputs to" in said, said


def test_rank_data_names_the_argument_a_missing_file_came_from(shards, capsys):
    for kwargs, named in (({"source": "/nonexistent/train.h5"}, "RankData source"),
                          ({"source": shards, "test": "/nonexistent/test.h5"}, "RankData test")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            hvd.RankData(batch_size=4, **kwargs)
        assert e.value.code == 2
        path = kwargs.get("test") or kwargs["source"]
        said = all_ranks(capsys.readouterr().err)  # checked on every rank: all fail alike
        assert said == [f"hpcaccel: error: {named} {path}: no such file\n"] + [""] * (hvd.size() - 1)


def test_the_documented_buffer_agreement_gives_every_rank_one_model():
    """docs/scripts.md's agree_buffers, run as the docs show it."""
    import re
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "scripts.md")).read()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def agree_buffers" in b]
    scope = {"hvd": hvd}
    exec(code, scope)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    rank, size = hvd.rank(), hvd.size()
    model(torch.randn(4, 2) + rank)  # a training forward on this rank's own samples
    mine = [b.clone() for b in model.buffers()]
    scope["agree_buffers"](model)
    every = all_ranks([b.clone() for b in model.buffers()])
    for i, b in enumerate(model.buffers()):
        assert all(torch.equal(r[i], every[0][i]) for r in every)
    means = all_ranks(mine)
    torch.testing.assert_close(model[1].running_mean, sum(m[0] for m in means) / size)
    torch.testing.assert_close(model[1].running_var, sum(m[1] for m in means) / size)
    assert int(model[1].num_batches_tracked) == 1


def test_save_before_resume_is_refused(tmp_path_factory):
    model, opt = model_and_optimizer()
    with hvd.Job(shared_dir(tmp_path_factory, "early"), model, opt, epochs=1) as job:
        with pytest.raises(RuntimeError, match="resume"):
            job.save(epoch=0, step=0)


def test_job_keeps_the_distributed_optimizers_powersgd_state_per_rank(tmp_path_factory):
    """PowerSGD's error feedback differs per rank: each rank gets its own back."""
    out = shared_dir(tmp_path_factory, "powersgd")

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 3))
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(),
                                       compression=hvd.Compression.powersgd(2, 0))
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model, opt

    model, opt = make()
    inputs = torch.Generator().manual_seed(hvd.rank())
    with hvd.Job(out, model, opt, epochs=1) as job:
        job.resume()
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 16, generator=inputs)).square().sum().backward()
            opt.step()
            job.should_stop()
        job.save(epoch=0, step=3)
        saved = opt._hvd_reducer.state_dict()
    assert saved.get("powersgd"), saved
    model, opt = make()
    with pytest.raises(AssertionError):  # a new optimizer's differs
        torch.testing.assert_close(opt._hvd_reducer.state_dict(), saved, rtol=0, atol=0)
    with hvd.Job(out, model, opt, epochs=1) as job:
        job.resume()
        torch.testing.assert_close(opt._hvd_reducer.state_dict(), saved, rtol=0, atol=0)
