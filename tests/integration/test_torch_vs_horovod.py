"""hpcaccel.torch against real Horovod 0.28.1: the same training script (fixed-seed MLP,
per-rank data, DistributedOptimizer, broadcast_parameters and broadcast_optimizer_state,
SGD with momentum, Adam, predivide, op Sum with two backward passes per step, fp16
compression, a parameter used on one rank only) run with `horovod.torch` and with
`hpcaccel.torch`, each as its own 2-rank job, ends with the same parameters."""
import os

import pytest

from support import mpirun_python, requires_horovod

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "torch_vs_horovod_train.py")


def run(which, out):
    r = mpirun_python(2, SCRIPT, which, str(out), timeout=300)
    assert r.returncode == 0, f"{which}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    import torch
    return torch.load(out, weights_only=True)


@requires_horovod
def test_training_with_hpcaccel_torch_ends_where_horovod_ends(tmp_path):
    import torch

    horovod = run("horovod", tmp_path / "horovod.pt")
    ours = run("hpcaccel", tmp_path / "hpcaccel.pt")
    assert sorted(ours) == sorted(horovod)
    for name, (initial, final) in horovod.items():
        our_initial, our_final = ours[name]
        # fp16 sums round differently (Horovod also scales in 16 bits); the rest is float32
        tol = dict(rtol=1e-3, atol=1e-3) if "fp16" in name else dict(rtol=1e-5, atol=1e-6)
        for key in final:
            torch.testing.assert_close(our_initial[key], initial[key], rtol=0, atol=0,
                                       msg=f"{name}: {key} (start)")
            assert not torch.equal(final[key], initial[key]), f"{name}: {key} did not train"
            torch.testing.assert_close(our_final[key], final[key], **tol, msg=f"{name}: {key}")
