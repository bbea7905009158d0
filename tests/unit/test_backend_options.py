"""Backend choice and the communication knobs: flags, TOML, validation (no MPI needed)."""
import pytest

from hpcaccel.comm import BACKENDS, COMPRESSIONS, make_reducer, reducer_options
from hpcaccel.config import TrainConfig, parse_args
from hpcaccel.errors import UsageError


def test_backend_choices_match_the_factory():
    choices = [f for f in TrainConfig.__dataclass_fields__.values() if f.name == "backend"][0]
    assert tuple(choices.metadata["choices"]) == BACKENDS == ("auto", "horovod", "mpi")
    compression = TrainConfig.__dataclass_fields__["compression"]
    assert tuple(compression.metadata["choices"]) == COMPRESSIONS


def test_knobs_from_flags_reach_the_reducer_options():
    cfg = parse_args(["--backend", "horovod", "--compression", "fp16", "--accum-steps", "4",
                      "--fusion-mb", "64", "--cycle-time-ms", "2.5", "--bucket-mb", "8",
                      "--allreduce", "ring"])
    assert (cfg.backend, cfg.accum_steps) == ("horovod", 4)
    assert reducer_options(cfg) == {"bucket_bytes": 8 * 2**20, "compression": "fp16",
                                    "fusion_bytes": 64 * 2**20, "cycle_time_ms": 2.5,
                                    "powersgd_rank": 4, "powersgd_start_step": 0,
                                    "allreduce": "ring", "device": "auto", "shard": "none"}
    assert reducer_options(parse_args(["--shard", "gradients"]))["shard"] == "gradients"


def test_horovod_knobs_default_to_horovods_own():
    options = reducer_options(parse_args([]))
    assert options["bucket_bytes"] is None  # --bucket-mb auto: the reducer measures the link
    assert options["fusion_bytes"] is None and options["cycle_time_ms"] is None
    assert options["compression"] == "none"


@pytest.mark.parametrize("toml,want", [("bucket-mb = 4.0", 4 << 20), ("bucket_mb = 2", 2 << 20),
                                       ('bucket-mb = "auto"', None), ('bucket-mb = "8"', 8 << 20)])
def test_bucket_mb_from_toml_as_number_or_auto(tmp_path, toml, want):
    f = tmp_path / "run.toml"
    f.write_text(toml + "\n")
    assert reducer_options(parse_args(["--config", str(f)]))["bucket_bytes"] == want


def test_knobs_from_toml(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('backend = "mpi"\ncompression = "bf16"\naccum-steps = 2\ncycle_time_ms = 3\n')
    cfg = parse_args(["--config", str(f)])
    assert (cfg.backend, cfg.compression, cfg.accum_steps, cfg.cycle_time_ms) == ("mpi", "bf16", 2, 3.0)


@pytest.mark.parametrize("argv,needle", [
    (["--compression", "fp8"], "--compression"),
    (["--accum-steps", "0"], "--accum-steps"),
    (["--accum-steps", "17", "--batch-size", "16"], "--accum-steps 17 is more than --batch-size 16"),
    (["--fusion-mb", "-1"], "--fusion-mb"),
    (["--cycle-time-ms", "0"], "--cycle-time-ms"),
    (["--bucket-mb", "0"], "--bucket-mb must be auto or a positive number"),
    (["--bucket-mb", "big"], "--bucket-mb must be auto or a positive number"),
    (["--bucket-mb", "inf"], "--bucket-mb must be auto or a positive number"),
    (["--bucket-mb", "nan"], "--bucket-mb must be auto or a positive number"),
])
def test_bad_knobs_name_the_flag(argv, needle):
    with pytest.raises(UsageError, match=needle):
        parse_args(argv)


@pytest.mark.parametrize("kwargs,needle", [
    ({"name": "nccl"}, "--backend: unknown backend 'nccl'"),
    ({"name": "mpi", "compression": "fp8"}, "--compression: unknown 'fp8'"),
])
def test_make_reducer_rejects_unknown_names_before_any_communication(kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        make_reducer(**kwargs)
