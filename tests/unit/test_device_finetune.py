"""Pure logic of device choice, precision checks, fine-tuning loads, freezing, LR schedule."""
import pytest
import torch
from torch import nn

from hpcaccel import device, finetune
from hpcaccel.config import parse_args
from hpcaccel.errors import UsageError
from hpcaccel.models import build_model
from hpcaccel.optim import LRSchedule


@pytest.mark.parametrize("choice,local_rank,local_size,gpus,expected", [
    ("auto", 0, 4, 0, "cpu"),
    ("cpu", 1, 4, 4, "cpu"),
    ("auto", 3, 4, 4, "cuda:3"),     # one rank per GPU: the local rank's
    ("cuda", 2, 4, 1, "cuda:0"),     # launcher isolated one GPU per rank
])
def test_device_per_rank(choice, local_rank, local_size, gpus, expected):
    assert str(device.resolve(choice, local_rank, local_size, cuda_count=gpus)) == expected


@pytest.mark.parametrize("gpus,local_size,needle", [(0, 1, "no CUDA device"), (2, 4, "4 ranks on this node but 2 GPUs")])
def test_device_cuda_errors(gpus, local_size, needle):
    with pytest.raises(UsageError, match=needle):
        device.resolve("cuda", 0, local_size, cuda_count=gpus)


def test_fp16_needs_cuda_bf16_runs_on_cpu():
    with pytest.raises(UsageError, match="fp16 needs CUDA"):
        device.check_precision("fp16", torch.device("cpu"))
    device.check_precision("bf16", torch.device("cpu"))
    with device.autocast("bf16", torch.device("cpu")):
        assert nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    assert device.grad_scaler("bf16", torch.device("cpu")) is None


def test_init_from_loads_matching_tensors_and_keeps_a_new_head(tmp_path):
    torch.manual_seed(0)
    old = build_model("cnn", (1, 8, 8), 5)
    torch.save(old.state_dict(), tmp_path / "model.pt")
    new = build_model("cnn", (1, 8, 8), 10)
    loaded, fresh = finetune.load_matching(new, str(tmp_path / "model.pt"))
    assert fresh == ["head.weight", "head.bias"]
    assert all(torch.equal(new.state_dict()[k], old.state_dict()[k]) for k in loaded)
    assert any(k.startswith("body.") for k in loaded)


def test_init_from_rejects_other_models_and_non_models(tmp_path):
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(UsageError, match="no tensor matches this model"):
        finetune.load_matching(build_model("cnn", (1, 8, 8), 10), str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(UsageError, match="--init-from .*junk.pt: not a readable model file"):
        finetune.load_matching(nn.Linear(3, 3), str(tmp_path / "junk.pt"))


def test_freeze_by_prefix_on_name_boundaries():
    model = nn.ModuleDict({"body": nn.Linear(2, 2), "bodyguard": nn.Linear(2, 2), "head": nn.Linear(2, 2)})
    frozen = finetune.freeze(model, finetune.parse_prefixes("body"))
    assert frozen == ["body.weight", "body.bias"]
    assert model["bodyguard"].weight.requires_grad and not model["body"].weight.requires_grad
    with pytest.raises(UsageError, match="--freeze nope"):
        finetune.freeze(model, ["nope"])
    with pytest.raises(UsageError, match="freezes every parameter"):
        finetune.freeze(model, ["body", "bodyguard", "head"])


def test_lr_schedule_linear_scaling_warmup_cosine():
    cfg = parse_args(["--lr", "0.1", "--lr-ref-batch", "32", "--batch-size", "16", "--epochs", "2",
                      "--warmup-epochs", "1", "--lr-schedule", "cosine"])
    sched = LRSchedule(cfg, world_size=8, steps_per_epoch=10)  # global batch 128: peak 0.4
    assert sched.peak == pytest.approx(0.4)
    assert sched.lr(0) == pytest.approx(0.04) and sched.lr(9) == pytest.approx(0.4)
    assert sched.lr(10) == pytest.approx(0.4) and sched.lr(19) < 0.02
