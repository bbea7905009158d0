"""Training configuration: one typed dataclass, documented per field.

The CLI (`python -m hpcaccel.train --help`) and TOML config files (`--config run.toml`) are
both generated from `TrainConfig`; the command line overrides the file. summary.json
records the resolved config.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Optional

from .cli import Parser, boolean
from .errors import UsageError

# the one tomllib import (the standard library's from Python 3.11, tomli before)
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# choices of the flags, in one place (optim.py, augment.py, tasks.py and comm/ implement them)
OPTIMIZERS = ("sgd", "adamw", "lars")
SCHEDULES = ("constant", "cosine", "step")
AUGMENTATIONS = ("none", "shift", "flip", "shift+flip")
BACKENDS = ("auto", "horovod", "mpi")
COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")
SHARDS = ("none", "optimizer", "gradients")  # --shard (comm/sharding.py)
PROGRESS = ("auto", "true", "false")
TASKS = ("auto", "classify", "regress", "segment")  # or package.module:factory
LOSSES = ("auto", "mse", "l1", "huber")
ALLREDUCES = ("auto", "sliced", "ring", "hierarchical")
# --lr where neither the command line nor --config sets it: each optimizer's own (AdamW's
# step is ~lr x sign(g), so SGD's 0.05 is far too large for it and learns nothing)
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3, "lars": 0.05}


def _opt(default, help, choices=None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


@dataclass
class TrainConfig:
    # data
    data: str = _opt("digits", "training data: a built-in source (digits, synthetic), an HDF5 "
                     "file with datasets x and y, or a shard index (index.json) from "
                     "`python -m hpcaccel.data pack`")
    test_data: Optional[str] = _opt(None, "test data (same forms as --data); default: the "
                                    "built-in source's test split, or none for files")
    synthetic_samples: int = _opt(8192, "samples in the synthetic source")
    synthetic_shape: str = _opt("1,28,28", "sample shape of the synthetic source, comma separated")
    synthetic_classes: int = _opt(10, "classes in the synthetic source")
    shuffle: bool = _opt(True, "shuffle per epoch (deterministic from --seed); off: global "
                         "batch k is samples [k*G, (k+1)*G) whatever the rank count")
    check_data: bool = _opt(True, "before training, scan the data (each rank its share) for "
                            "labels out of range and NaN/inf samples")
    stage_dir: Optional[str] = _opt(None, "copy the data files this host's ranks will read, "
                                    "once per host, into this node-local directory (local SSD, "
                                    "$SLURM_TMPDIR) before training and read them from there; "
                                    "default: read in place")
    # model and optimisation
    task: str = _opt("auto", "what is learned from y: classify (one integer label per sample; "
                     "cross-entropy, accuracy), regress (float targets of any shape; --loss; "
                     "rmse, mae, r2), segment (an integer label per element; per-element "
                     "cross-entropy, pixel accuracy, mean IoU), or package.module:factory (your "
                     "own loss and metrics, docs/training.md); auto: from y (labels per sample "
                     "classify, float targets regress, labels per element segment)")
    loss: str = _opt("auto", "--task regress: mse, l1 or huber (auto: mse); classify and segment "
                     "use cross-entropy", choices=LOSSES)
    model: str = _opt("auto", "built-in model (mlp, cnn, resnet, fcn: a class or value per "
                      "pixel) or package.module:factory, called as factory(input_shape, "
                      "output_shape) with the output shape the task needs; auto: fcn for outputs "
                      "per pixel, cnn for other (channels, height, width) samples, else mlp")
    dropout: float = _opt(0.0, "dropout probability in the built-in models' heads")
    epochs: int = _opt(20, "passes over the training data")
    batch_size: int = _opt(16, "samples per rank per step (global batch = this x ranks)")
    lr: Optional[float] = _opt(None, "peak learning rate (scaled by --lr-ref-batch, if set)",
                               shown_default="--optimizer's own: " + ", ".join(
                                   f"{name} {lr:g}" for name, lr in DEFAULT_LR.items()))
    lr_ref_batch: int = _opt(0, "linear scaling rule: peak lr = --lr x global batch / this "
                             "(Goyal et al. 2017); 0: --lr as given")
    lr_schedule: str = _opt("constant", "after warm-up: constant, cosine (to 0 at the end), or "
                            "step (x --lr-step-gamma every --lr-step-epochs)",
                            choices=SCHEDULES)
    warmup_epochs: float = _opt(0.0, "linear learning-rate warm-up over this many epochs")
    lr_step_epochs: int = _opt(0, "step schedule: epochs between decays")
    lr_step_gamma: float = _opt(0.1, "step schedule: decay factor")
    optimizer: str = _opt("sgd", "sgd (momentum, optionally Nesterov), adamw, or lars "
                          "(layer-wise adaptive rates for large batches)",
                          choices=OPTIMIZERS)
    momentum: float = _opt(0.9, "momentum (sgd, lars)")
    nesterov: bool = _opt(False, "Nesterov momentum (sgd)")
    weight_decay: float = _opt(0.0, "weight decay on weights (biases and normalisation "
                               "parameters exempt); decoupled for adamw")
    clip_grad_norm: float = _opt(0.0, "clip the global norm of the averaged gradient to this; "
                                 "0: off")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss (classify, "
                                  "segment), in [0, 1)")
    augment: str = _opt("none", "image augmentation per rank, deterministic from --seed: random "
                        "shift by one pixel, left-right flip, or both",
                        choices=AUGMENTATIONS)
    precision: str = _opt("fp32", "fp32; bf16 autocast (CPU or CUDA); fp16 autocast with "
                          "dynamic loss scaling (CUDA only)", choices=("fp32", "bf16", "fp16"))
    device: str = _opt("auto", "auto: one CUDA GPU per rank (the local rank's) where CUDA is "
                       "available, else CPU", choices=("auto", "cpu", "cuda"))
    init_from: Optional[str] = _opt(None, "fine-tuning: start from this model.pt or checkpoint, "
                                    "loading every tensor whose name and shape match (a head "
                                    "for a different class count stays new)")
    freeze: str = _opt("", "fine-tuning: comma-separated parameter name prefixes to freeze, "
                       "e.g. body or 0,3")
    seed: int = _opt(0, "seed for initialisation, shuffling, augmentation and synthetic data")
    # parallelism
    backend: str = _opt("auto", "gradient allreduce backend: horovod (Horovod's ring-allreduce), "
                        "mpi (hpcaccel's mpi4py reducer); auto: the faster one for the device, mpi "
                        "on CPU, horovod on CUDA where it has GPU operations (docs/backends.md)",
                        choices=BACKENDS)
    bucket_mb: str = _opt("auto", "mpi backend: gradient bucket size in MiB; each bucket's "
                          "allreduce starts as soon as its gradients are ready during backward; "
                          "auto: from the link's latency and bandwidth, measured at start-up, "
                          "and the model's gradient size (shown on the start-up line)",
                          number_or_word=True)
    allreduce: str = _opt("auto", "mpi backend: how each bucket is summed: sliced (the MPI "
                          "library's allreduce in 8 MiB slices), ring (pipelined ring over "
                          "point-to-point), hierarchical (within each host, then across hosts, "
                          "then within); auto: sliced on one host, across hosts hierarchical "
                          "with several ranks per host, else ring (see docs/backends.md)",
                          choices=ALLREDUCES)
    fusion_mb: Optional[float] = _opt(None, "horovod backend: tensor fusion threshold in MiB "
                                      "(HOROVOD_FUSION_THRESHOLD; 0 disables fusion); unset: "
                                      "Horovod's (128) or the environment's")
    cycle_time_ms: Optional[float] = _opt(None, "horovod backend: milliseconds between Horovod's "
                                          "communication cycles (HOROVOD_CYCLE_TIME); unset: "
                                          "Horovod's (1) or the environment's")
    compression: str = _opt("none", "gradients on the wire: none (fp32), fp16 or bf16 (half the "
                            "bytes, rounded; bf16 only with the mpi backend), or powersgd "
                            "(matrices as low-rank factors with error feedback; mpi backend only)",
                            choices=COMPRESSIONS)
    powersgd_rank: int = _opt(4, "--compression powersgd: rank of the factors; each n x m "
                              "matrix sends (n + m) x this numbers instead of n x m")
    powersgd_start_step: int = _opt(0, "--compression powersgd: exact allreduce for the first "
                                    "this many steps, then compressed")
    shard: str = _opt("none", "mpi backend: split the optimizer's state (optimizer: ZeRO stage "
                      "1) or also the reduced gradients (gradients: stage 2) across ranks, "
                      "each rank stepping its part; updated parameters are gathered per "
                      "bucket while the next forward runs (docs/memory.md)",
                      choices=SHARDS)
    accum_steps: int = _opt(1, "gradient accumulation: split each rank's batch into this many "
                            "micro-batches, communicate only after the last; same result as one "
                            "pass over the batch (BatchNorm statistics aside), less memory")
    stall_timeout: float = _opt(300.0, "seconds without a completed step after which a rank "
                                "reports its last step and aborts the whole job (a peer died "
                                "or hung); 0 disables")
    nonfinite: str = _opt("stop", "on a NaN/inf loss on any rank: stop all ranks with an error, "
                          "or skip that step on all ranks and count it", choices=("stop", "skip"))
    threads: Optional[int] = _opt(None, "intra-op threads per rank (default: the rank's CPU "
                                  "affinity, shared evenly among ranks bound alike)")
    # output and checkpoints
    out: str = _opt("runs/latest", "output directory: metrics.jsonl, summary.json, model.pt, "
                    "checkpoints/")
    resume: str = _opt("none", "continue from a checkpoint: auto (this run's newest in "
                       "OUT/checkpoints, or start fresh if OUT holds no run; a finished run "
                       "says 'already complete', a larger --epochs extends it), a checkpoint "
                       "path, or none (a new run: OUT must not hold another run's outputs)")
    overwrite: bool = _opt(False, "when OUT holds another run's outputs that this run does not "
                           "continue: move them to OUT/previous/RUN_ID/ (nothing is deleted) "
                           "and start a new run, instead of stopping with an error")
    checkpoint_every: int = _opt(0, "also checkpoint every N steps (0: only at the end of each "
                                 "epoch and when stopped by SIGUSR1/SIGTERM)")
    checkpoint_every_seconds: float = _opt(0.0, "also checkpoint when this many seconds have "
                                           "passed since the last checkpoint, at a step all "
                                           "ranks agree on (0: off): the most work a failure "
                                           "costs; the elastic Slurm template sets it")
    keep_checkpoints: int = _opt(2, "how many of the newest checkpoints to keep")
    progress: str = _opt("auto", "progress bar on rank 0: auto (only where the user's "
                         "terminal shows rank 0's stderr, directly or through mpirun; in Slurm "
                         "logs and pipes plain per-epoch lines), true, false",
                         choices=PROGRESS)
    timeline: Optional[str] = _opt(None, "write a Chrome-trace JSON of every rank's data wait, "
                                   "forward/backward, allreduce and optimizer spans to this "
                                   "file (open in Perfetto, ui.perfetto.dev)")

    def __post_init__(self):
        # resolved here, so summary.json's config and everything downstream see the lr used
        if self.lr is None and self.optimizer in DEFAULT_LR:
            self.lr = DEFAULT_LR[self.optimizer]

    def validate(self) -> "TrainConfig":
        positive = {"epochs": self.epochs, "batch_size": self.batch_size,
                    "synthetic_samples": self.synthetic_samples,
                    "synthetic_classes": self.synthetic_classes,
                    "accum_steps": self.accum_steps, "powersgd_rank": self.powersgd_rank}
        for name, value in positive.items():
            if value <= 0:
                raise UsageError(f"--{_flag(name)} must be positive, got {value}")
        if self.keep_checkpoints < 1:
            raise UsageError(f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.powersgd_start_step < 0:
            raise UsageError(f"--powersgd-start-step must not be negative, got {self.powersgd_start_step}")
        if self.checkpoint_every < 0:
            raise UsageError(f"--checkpoint-every must not be negative, got {self.checkpoint_every}")
        for name in ("lr", "momentum", "weight_decay", "stall_timeout", "clip_grad_norm",
                     "checkpoint_every_seconds",
                     "warmup_epochs", "lr_ref_batch", "lr_step_epochs", "lr_step_gamma"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        for name in ("dropout", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.task not in TASKS and ":" not in self.task:
            raise UsageError(f"--task: unknown task {self.task!r} (choose from "
                             f"{', '.join(TASKS)}, or package.module:factory)")
        if self.shard != "none":
            if self.backend == "horovod":
                raise UsageError("--shard: the mpi backend's; Horovod has no sharded optimizer "
                                 "(use --backend mpi or auto)")
            if self.compression == "powersgd":
                raise UsageError("--shard with --compression powersgd: PowerSGD's low-rank "
                                 "factors of whole matrices cannot be split across ranks; use "
                                 "one of them")
            if self.precision == "fp16":
                raise UsageError("--shard with --precision fp16: the loss scaler's overflow "
                                 "check needs the whole gradient on every rank; use --precision "
                                 "bf16 or fp32")
        if self.lr_schedule == "step" and self.lr_step_epochs == 0:
            raise UsageError("--lr-schedule step needs --lr-step-epochs (epochs between decays)")
        if self.accum_steps > self.batch_size:
            raise UsageError(f"--accum-steps {self.accum_steps} is more than --batch-size "
                             f"{self.batch_size}: every micro-batch needs at least one sample")
        if str(self.bucket_mb) != "auto":
            try:
                mb = float(self.bucket_mb)
            except ValueError:
                mb = float("nan")
            if not (math.isfinite(mb) and mb > 0):
                raise UsageError(f"--bucket-mb must be auto or a positive number of MiB, got "
                                 f"{self.bucket_mb!r}")
            self.bucket_mb = mb
        if self.fusion_mb is not None and self.fusion_mb < 0:
            raise UsageError(f"--fusion-mb must not be negative, got {self.fusion_mb}")
        if self.cycle_time_ms is not None and self.cycle_time_ms <= 0:
            raise UsageError(f"--cycle-time-ms must be positive, got {self.cycle_time_ms}")
        if self.threads is not None and self.threads <= 0:
            raise UsageError(f"--threads must be positive, got {self.threads}")
        try:
            shape = [int(s) for s in self.synthetic_shape.split(",")]
            assert shape and all(s > 0 for s in shape)
        except (ValueError, AssertionError):
            raise UsageError(f"--synthetic-shape must be positive integers separated by commas, "
                             f"got {self.synthetic_shape!r}") from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def build_parser(prog: str = "python -m hpcaccel.train", description: str = "",
                 quiet: bool = False) -> Parser:
    parser = Parser(prog=prog, description=description, quiet=quiet,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="TOML file setting any of the flags "
                        "below (keys as flag names, - or _); the command line overrides it")
    for f in dataclasses.fields(TrainConfig):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if "bool" in kind:
            argtype, metavar = boolean, "{true,false}"
        elif "int" in kind:
            argtype, metavar = int, "N"
        elif "float" in kind:
            argtype, metavar = float, "X"
        else:
            argtype, metavar = str, None
        choices = f.metadata.get("choices")
        parser.add_argument(f"--{_flag(f.name)}", dest=f.name, type=argtype, choices=choices,
                            metavar=None if choices else metavar,
                            default=argparse.SUPPRESS, help=f.metadata["help"] +
                            f" (default: {f.metadata.get('shown_default', f.default)})")
    return parser


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read TOML: {e}") from None
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"--config {path}: unknown key {key!r}")
        if name == "progress" and isinstance(value, bool):  # progress = false in TOML
            value = "true" if value else "false"
        values[name] = value
    return values


def given_values(argv=None, quiet: bool = False) -> tuple[dict, str | None]:
    """The values the user set, by field name: the --config file's, overridden by the
    command line's (parsed, so a flag counts however it was written); and the file's path.
    Fields left at their defaults are absent."""
    parser = build_parser(description=__doc__.splitlines()[0], quiet=quiet)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    values = load_toml(config_path) if config_path else {}
    values.update(args)
    return values, config_path


def parse_args(argv=None, quiet: bool = False) -> TrainConfig:
    values, config_path = given_values(argv, quiet)
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise UsageError(f"--config {config_path}: {e}") from None
    return _coerce(cfg, config_path).validate()


def _coerce(cfg: TrainConfig, source) -> TrainConfig:
    """Values from TOML arrive typed by TOML; check they match the field types."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if value is None and "Optional" in kind:
            continue
        ok = (isinstance(value, (str, int, float)) and not isinstance(value, bool)
              if f.metadata.get("number_or_word") else
              isinstance(value, bool) if "bool" in kind else
              isinstance(value, int) and not isinstance(value, bool) if "int" in kind else
              isinstance(value, (int, float)) and not isinstance(value, bool) if "float" in kind else
              isinstance(value, str))
        if not ok:
            raise UsageError(f"--config {source}: {f.name} must be {kind}, got {value!r}")
        if "float" in kind:
            setattr(cfg, f.name, float(value))
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UsageError(f"--{_flag(f.name)}: invalid choice {value!r} (choose from {', '.join(choices)})")
    return cfg
