"""Ranks out of step in a script of one's own (hpcaccel.torch), under real mpirun: a rank
that leaves (its script returns, sys.exit, an uncaught exception, hvd.shutdown()) while
the others still communicate fails their pending collective within seconds, naming it;
uneven data without join is an error on every rank, naming what each was in; a sharded
optimizer refuses a joined rank. Before, the ranks waited forever (a stall warning every
60 s). Every run is bounded by a timeout, so a hang
fails the test."""
import re
import time

import pytest

from support import mpirun_python

SCRIPT = '''
import os, sys, time, torch
import hpcaccel.torch as hvd

hvd.init()
how, leaver = os.environ["HOW"], hvd.size() - 1
model = torch.nn.Linear(4, 2)
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               named_parameters=model.named_parameters(),
                               shard="optimizer" if how == "join-sharded" else "none")

def step():
    opt.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    opt.step()

for _ in range(3):
    step()
    hvd.allreduce(torch.ones(1), name="loss")
if how == "uneven":  # the last rank ran out of data: into the epoch's end, no join
    if hvd.rank() != leaver:
        step()
    hvd.allreduce(torch.ones(1), name="train_loss")
elif how == "join-sharded":  # a joined rank cannot step a part of the optimizer
    if hvd.rank() == leaver:
        hvd.join()
    else:
        try:
            step()
        except hvd.HorovodInternalError as e:
            print(f"FAILED {hvd.rank()} {time.time()} {e}", flush=True)
            raise
elif hvd.rank() == leaver:
    time.sleep(0.5)  # the others wait in their collective by now
    print(f"LEFT {time.time()}", flush=True)
    if how == "exit":
        sys.exit(0)
    if how == "raise":
        raise RuntimeError("boom")
    if how == "shutdown":
        hvd.shutdown()
        time.sleep(60)  # alive, but out of the job: the others must not wait for it
else:
    try:
        step() if how in ("exit", "shutdown") else hvd.allreduce(torch.ones(1), name="next")
    except hvd.HorovodInternalError as e:
        print(f"FAILED {hvd.rank()} {time.time()} {e}", flush=True)
        raise
print(f"DONE {hvd.rank()}", flush=True)
'''


def run(tmp_path, np_, how):
    (tmp_path / "leave.py").write_text(SCRIPT)
    t0 = time.time()
    r = mpirun_python(np_, str(tmp_path / "leave.py"), timeout=90, env={"HOW": how})
    return r, time.time() - t0


@pytest.mark.parametrize("np_,how", [(2, "exit"), (2, "shutdown"), (2, "raise"),
                                     (4, "return")])  # return and exit: the same exit path
def test_a_rank_that_leaves_fails_the_others_collectives_naming_it(tmp_path, np_, how):
    r, seconds = run(tmp_path, np_, how)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "DONE 0" not in out
    left = float(re.search(r"LEFT (\S+)", r.stdout).group(1))
    failed = {int(m.group(1)): (float(m.group(2)), m.group(3))
              for m in re.finditer(r"FAILED (\d+) (\S+) (.*)", r.stdout)}
    if how == "raise":  # the failing rank aborts the job itself (MPI_Abort), as before
        assert "hpcaccel.torch: rank 1 failed (RuntimeError)" in r.stderr, out[-3000:]
        return
    # The first rank to fail ends the job (MPI_Abort), which may kill another before it
    # prints its own error: every rank that printed names the leaver, and none finished.
    assert failed and set(failed) <= set(range(np_ - 1)), out[-3000:]
    for when, message in failed.values():
        assert f"rank {np_ - 1} left the job" in message, message
        assert when - left < 5.0, (when - left, message)  # the target: seconds
    why = {"return": "its process ended", "exit": "its process ended",
           "shutdown": "it called hvd.shutdown()"}[how]
    assert why in out


def test_uneven_data_without_join_is_an_error_on_every_rank_naming_both(tmp_path):
    # rank 0 is in optimizer.step()'s gradient exchange (the reducer's thread and
    # communicator), rank 1 in hvd.allreduce('train_loss') (the engine's)
    r, seconds = run(tmp_path, 2, "uneven")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    disagree = ("rank(s) 0: gradient exchange 'DistributedOptimizer #0' (1 buckets, 10 "
                "values); rank(s) 1: allreduce 'train_loss' (op Average, float32[1]); a rank "
                "with fewer batches than the others calls hvd.join() when it runs out")
    assert r.stderr.count(disagree) == 2, out[-3000:]  # once from each rank
    assert "DONE" not in out


def test_a_sharded_optimizer_refuses_a_joined_rank_naming_it(tmp_path):
    r, seconds = run(tmp_path, 2, "join-sharded")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    failed = re.search(r"FAILED 0 \S+ (.*)", r.stdout)
    assert failed, out[-3000:]
    assert ("gradient exchange 'DistributedOptimizer #0' (1 buckets, 10 values) is not "
            "supported while rank(s) 1 have joined") in failed.group(1)
