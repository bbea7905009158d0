"""--shard on the command line: the start-up line and summary say what each rank holds, a
sharded run ends where the unsharded one ends, its checkpoints are unsharded (a run
continues at another world size, sharded or not), a requeue at the same size stays bit for
bit, and what cannot be sharded is refused in one line with exit 2."""
import json
import subprocess

import pytest
import torch

from support import mpirun_command
from test_elastic_resume import assert_close_models, run, stopped_mid_epoch, train

# its tests share runs (module fixtures): one worker runs them all (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("shard_cli")


def models_equal(got, want):
    got, want = (torch.load(p, weights_only=True) for p in (got, want))
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("none")
    run(train(2, out, "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.01"))
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradients")
    text = run(train(2, out, "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.01",
                     "--shard", "gradients", "--clip-grad-norm", "1.0"))
    return out, text


def test_a_sharded_run_says_so_and_ends_where_the_unsharded_one_ends(sharded, unsharded, tmp_path):
    out, text = sharded
    assert "optimizer state and gradients sharded across 2 ranks" in text, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shard"] == "gradients"
    assert summary["optimizer_state_bytes_per_rank_max"] > 0
    clipped = tmp_path / "clipped"
    run(train(2, clipped, "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.01",
              "--clip-grad-norm", "1.0"))
    assert_close_models(out / "model.pt", clipped / "model.pt")
    # the checkpoint's optimizer state is the whole one: as large as the unsharded run's
    from hpcaccel import checkpoint
    mine = torch.load(checkpoint.list_checkpoints(str(out))[-1], weights_only=True)["optimizer"]
    theirs = torch.load(checkpoint.list_checkpoints(str(unsharded))[-1], weights_only=True)["optimizer"]
    assert sorted(mine["state"]) == sorted(theirs["state"])
    for k in theirs["state"]:
        assert mine["state"][k]["exp_avg"].shape == theirs["state"][k]["exp_avg"].shape


_references = {}


def reference(tmp_path_factory, flags):
    """The unsharded run of `flags` at 2 ranks (cached)."""
    if flags not in _references:
        out = tmp_path_factory.mktemp("unsharded")
        run(train(2, out, *flags))
        _references[flags] = out
    return _references[flags]


@pytest.mark.parametrize("optimizer,extra,shard", [
    (opt, clip, shard) for opt in ("sgd", "adamw", "lars")
    for clip in ((), ("--clip-grad-norm", "1.0")) for shard in ("optimizer", "gradients")
] + [("adamw", ("--clip-grad-norm", "1.0", "--accum-steps", "2", "--compression", "bf16"),
      "gradients")],
    ids=lambda v: (v if isinstance(v, str) else "-".join(a.strip("-") for a in v) or "no-clip"))
def test_every_optimizer_and_clipping_sharded_ends_where_unsharded_ends(
        tmp_path_factory, optimizer, extra, shard):
    """The same math through the command line, every optimizer x clipping x shard level (and
    accumulation with the bf16 wire): AdamW near the clipping threshold turns a last-bit
    difference in the clipping coefficient into a different run, so for the elementwise
    optimizers the sharded run must be bit for bit the unsharded one (2 ranks: a
    reduce-scatter adds what the allreduce adds). LARS's per-layer norms are summed from
    pieces: float tolerance."""
    flags = ("--epochs", "1", "--synthetic-samples", "512", "--batch-size", "16",
             "--optimizer", optimizer, "--lr", "0.01", *extra)
    want = reference(tmp_path_factory, flags)
    out = tmp_path_factory.mktemp(f"shard-{shard}")
    run(train(2, out, *flags, "--shard", shard))
    if optimizer == "lars":
        assert_close_models(out / "model.pt", want / "model.pt")
    else:
        models_equal(out / "model.pt", want / "model.pt")


@pytest.mark.parametrize("before,after,batch,flags", [
    (2, 1, 16, (["--shard", "gradients"], [])),
    (1, 2, 32, ([], ["--shard", "optimizer"])),
], ids=["2-sharded-resumed-at-1-unsharded", "1-rank-resumed-at-2-sharded"])
def test_sharded_checkpoints_continue_at_another_world_size(tmp_path, unsharded, before, after,
                                                            batch, flags):
    out = tmp_path / "run"
    common = ["--optimizer", "adamw", "--lr", "0.01"]
    stopped_mid_epoch(train(before, out, "--batch-size", str(batch), *common, *flags[0]))
    run(train(after, out, "--batch-size", str(batch), *common, *flags[1], "--resume", "auto"))
    assert_close_models(out / "model.pt", unsharded / "model.pt")


def test_a_sharded_requeue_at_the_same_size_is_bit_exact(tmp_path, sharded):
    out = tmp_path / "run"
    flags = ["--batch-size", "16", "--optimizer", "adamw", "--lr", "0.01", "--shard",
             "gradients", "--clip-grad-norm", "1.0"]
    stopped_mid_epoch(train(2, out, *flags))
    run(train(2, out, *flags, "--resume", "auto"))
    models_equal(out / "model.pt", sharded[0] / "model.pt")


@pytest.mark.parametrize("flags,says", [
    (["--shard", "gradients", "--compression", "powersgd"], "--shard with --compression powersgd"),
    (["--shard", "optimizer", "--backend", "horovod"], "--shard: the mpi backend's"),
    (["--shard", "optimizer", "--precision", "fp16"], "--shard with --precision fp16"),
    (["--shard", "half"], "--shard"),
])
def test_what_cannot_be_sharded_is_one_line_and_exit_2(tmp_path, flags, says):
    r = subprocess.run(mpirun_command(1, "-m", "hpcaccel.train", "--data", "synthetic",
                                      "--out", str(tmp_path / "o"), *flags),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert says in r.stderr, r.stderr
    assert not (tmp_path / "o" / "run.json").exists()
