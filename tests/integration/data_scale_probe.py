"""Run under mpirun by test_data_at_scale.py: resolve a sharded dataset the way train.py
does (metadata read once, broadcast), read two epochs and the evaluation split on every rank,
and print, on rank 0, one JSON line with every rank's counters per phase."""
import json
import sys

from hpcaccel.control import ControlPlane
from hpcaccel.data import COUNTERS, RankReader, eval_batches, resolve

index, shuffle = sys.argv[1], sys.argv[2] == "true"
control = ControlPlane()
phases = {}


def mark(name):
    phases[name] = COUNTERS.snapshot()


mark("begin")
train, _ = control.collectively(resolve, index, None, samples=0, shape=(1,), classes=2, seed=0,
                                pack=False, wait=control.agree, inspect=control.is_main,
                                share=control.broadcast)
mark("startup")
reader = RankReader(train, control.rank, control.size, 4, shuffle=shuffle, seed=11)
firsts = []
for epoch in (0, 1):
    samples = 0
    for x, _ in reader.epoch(epoch):
        samples += len(x)
        if epoch == 0 and len(firsts) < 2:
            firsts.append(x[:, 0].tolist())
    mark(f"epoch{epoch}")
    phases[f"samples{epoch}"] = samples
evaluated = sum(len(y) for _, y in eval_batches(train, control.rank, control.size, 16))
mark("eval")
phases["evaluated"] = evaluated
phases["first_batches"] = firsts
per_rank = control.gather(phases)
if control.is_main:
    print("PROBE " + json.dumps({"world": control.size, "files": len(train.files),
                                 "samples": train.samples, "ranks": per_rank}), flush=True)
