"""`python -m hpcaccel.train` under real mpirun: outputs, accuracy, bad input, --help."""
import json
import os

import pytest
import torch

from support import BACKEND_PARAMS, train_cli as mpirun


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_digits_at_4_ranks_reaches_95_percent(tmp_path, backend):
    out = tmp_path / "run"
    r = mpirun(4, "--out", str(out), "--epochs", "10", "--backend", backend)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("world_size", "backend", "epochs", "steps", "final_train_loss", "test_accuracy",
                "samples_per_second", "wall_seconds", "config"):
        assert key in summary
    assert summary["world_size"] == 4 and summary["backend"] == backend
    assert summary["test_accuracy"] >= 0.95
    assert summary["steps"] == 10 * (1437 // (16 * 4))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == list(range(1, 11))
    state = torch.load(out / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert r.stdout.count("hpcaccel: 4 ranks on 1 node(s)") == 1  # one start-up line


@pytest.mark.quick
def test_user_model_and_synthetic_data_at_2_ranks(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def tiny(shape, classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(shape[0] * shape[1], classes))\n")
    out = tmp_path / "run"
    r = mpirun(2, "--out", str(out), "--data", "synthetic", "--synthetic-samples", "512",
               "--synthetic-shape", "4,4", "--model", "mymodels:tiny", "--epochs", "2",
               env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"] == "mymodels:tiny" and summary["steps"] == 2 * (512 // 32)


def test_what_ran_at_one_rank_without_a_test_set(tmp_path):
    """The start-up line and summary.json name the compression and the allreduce that ran;
    one rank reads "1 rank"; without a test set the last line says so."""
    import numpy as np
    from hpcaccel.data import write_file

    data = str(tmp_path / "d.h5")
    rng = np.random.default_rng(0)
    write_file(data, [rng.standard_normal((256, 16)).astype(np.float32)],
               [rng.integers(0, 4, 256)], 256, (16,), 4, "test")
    out = tmp_path / "run"
    r = mpirun(1, "--data", data, "--model", "mlp", "--epochs", "1", "--compression", "bf16",
               "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    (start,) = [l for l in r.stdout.splitlines() if l.startswith("hpcaccel: 1 rank on 1 node(s)")]
    assert "backend mpi (allreduce: sliced MPI_Allreduce)" in start and "compression bf16" in start
    assert r.stdout.splitlines()[-1].startswith("done: no test set (--test-data), ")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["allreduce"], summary["compression"]) == ("sliced", "bf16")
    assert summary["test_accuracy"] is None


@pytest.mark.parametrize("args,needle", [
    (["--data", "/nonexistent/data.h5"], "--data /nonexistent/data.h5: no such file"),
    (["--lr", "-0.1"], "--lr must not be negative"),
    (["--model", "resnet9000"], "--model: unknown model"),
    (["--batch-size", "1000"], "fewer than ranks x --batch-size"),
    (["--init-from", "/nonexistent/model.pt"], "--init-from /nonexistent/model.pt: no such file"),
    (["--freeze", "nosuchlayer"], "--freeze nosuchlayer: no parameter name starts with it"),
    (["--precision", "fp16"], "--precision fp16 needs CUDA"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
])
def test_bad_input_one_line_exit_2_nothing_overwritten(tmp_path, args, needle):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("earlier result")
    r = mpirun(2, "--out", str(out), *args, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [l for l in r.stderr.splitlines() if l.startswith("hpcaccel: error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr
    assert (out / "summary.json").read_text() == "earlier result"
    assert sorted(os.listdir(out)) == ["summary.json"]


def test_help_lists_flags_once(tmp_path):
    r = mpirun(2, "--help", timeout=60)
    assert r.returncode == 0
    assert r.stdout.count("usage: python -m hpcaccel.train") == 1
    for flag in ("--data", "--model", "--backend", "--epochs", "--batch-size", "--lr",
                 "--optimizer", "--seed", "--threads", "--shuffle", "--out", "--config"):
        assert flag in r.stdout
