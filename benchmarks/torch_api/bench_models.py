"""The models and synthetic data of the script benchmark (benchmarks/torch_api/), shared by
the Horovod script (hvd_train.py) and the DDP script (ddp_train.py) so that every variant
trains the same thing. Plain torch: nothing here knows about hpcaccel or Horovod.

Models (3 x 32 x 32 inputs, 10 classes):
  mlp25m  3072 -> 6144 -> 1024 -> 10, 25.2M parameters (101 MB of gradients). The first
          layer (75 MB) gets its gradient last in backward: little to overlap.
  cnn8m   conv 3->32, 32->64, pool, 64->128, pool, linear 8192 -> 1024 -> 10: 8.5M
          parameters (34 MB), nearly all in the first linear layer, whose gradient is ready
          early in backward and can travel while the convolutions' backward runs.
"""
import torch
from torch import nn

SHAPE = (3, 32, 32)
CLASSES = 10


def build_model(name: str) -> nn.Module:
    if name == "mlp25m":
        return nn.Sequential(nn.Flatten(), nn.Linear(3072, 6144), nn.ReLU(),
                             nn.Linear(6144, 1024), nn.ReLU(), nn.Linear(1024, CLASSES))
    if name == "cnn8m":
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128 * 8 * 8, 1024), nn.ReLU(), nn.Linear(1024, CLASSES))
    raise ValueError(f"unknown model {name!r}: mlp25m or cnn8m")


MODELS = ("mlp25m", "cnn8m")


def synthetic_batches(batch: int, rank: int, seed: int = 0, count: int = 8):
    """`count` batches of (x, y) for this rank, the same for every variant: inputs from a
    normal distribution, labels uniform, from a generator seeded by (seed, rank)."""
    g = torch.Generator().manual_seed(seed * 100_003 + rank)
    return [(torch.randn((batch, *SHAPE), generator=g),
             torch.randint(0, CLASSES, (batch,), generator=g)) for _ in range(count)]


def parameter_checksum(model: nn.Module) -> float:
    """Sum of every parameter in float64: equal across variants that computed the same."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))
