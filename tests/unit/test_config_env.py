"""Configuration parsing and world detection logic (no MPI needed)."""
import pytest

from hpcaccel.comm.buckets import plan_buckets
from hpcaccel.config import TrainConfig, build_parser, parse_args
from hpcaccel.env import check_world_size, threads_per_rank
from hpcaccel.errors import UsageError


def test_defaults_train_digits():
    cfg = parse_args([])
    assert cfg.data == "digits" and cfg.backend == "auto" and cfg.shuffle


def test_every_field_has_a_documented_flag():
    text = build_parser().format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in text


def test_toml_config_and_cli_override(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('epochs = 3\nbatch-size = 8\nlr = 1\nshuffle = false\nmodel = "mlp"\n')
    cfg = parse_args(["--config", str(f), "--epochs", "5"])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.shuffle, cfg.model) == (5, 8, 1.0, False, "mlp")


def test_lr_defaults_to_the_optimizers_own_unless_given(tmp_path):
    """AdamW at SGD's 0.05 learns nothing: without --lr each optimizer takes its own."""
    assert parse_args([]).lr == 0.05
    assert parse_args(["--optimizer", "lars"]).lr == 0.05
    assert parse_args(["--optimizer", "adamw"]).lr == 0.001
    assert parse_args(["--optimizer", "adamw", "--lr", "0.05"]).lr == 0.05  # given: kept
    f = tmp_path / "run.toml"
    f.write_text('optimizer = "adamw"\n')
    assert parse_args(["--config", str(f)]).lr == 0.001
    assert parse_args(["--config", str(f), "--optimizer", "sgd"]).lr == 0.05
    f.write_text('optimizer = "adamw"\nlr = 0.2\n')
    assert parse_args(["--config", str(f)]).lr == 0.2
    assert TrainConfig(optimizer="adamw").to_dict()["lr"] == 0.001  # what summary.json records
    assert "adamw 0.001" in build_parser().format_help()


@pytest.mark.parametrize("argv,needle", [
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "x"], "--epochs"),
    (["--backend", "nccl"], "--backend"),
    (["--shuffle", "maybe"], "--shuffle"),
    (["--synthetic-shape", "3,a"], "--synthetic-shape"),
    (["--config", "/nonexistent.toml"], "/nonexistent.toml"),
    (["--dropout", "1"], "--dropout must be in"),
    (["--label-smoothing", "-0.1"], "--label-smoothing must be in"),
    (["--lr-schedule", "step"], "--lr-schedule step needs --lr-step-epochs"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must not be negative"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # no abbreviations
    (["--out", "x", "--resum", "auto"], "unrecognized arguments: --resum auto"),
])
def test_bad_flags_name_the_flag(argv, needle):
    with pytest.raises(UsageError, match=needle):
        parse_args(argv)


def test_bad_toml_key_and_type(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("epoch = 3\n")
    with pytest.raises(UsageError, match="unknown key 'epoch'"):
        parse_args(["--config", str(f)])
    f.write_text('epochs = "three"\n')
    with pytest.raises(UsageError, match="epochs"):
        parse_args(["--config", str(f)])


def test_threads_from_affinity():
    socket0, socket1, everything = frozenset(range(4)), frozenset(range(4, 8)), frozenset(range(8))
    # bound to a socket: all its cores
    assert threads_per_rank(socket0, [socket0, socket1]) == 4
    # unbound ranks share the machine evenly
    assert threads_per_rank(everything, [everything] * 4) == 2
    # oversubscribed: never below one
    assert threads_per_rank(frozenset({0, 1}), [frozenset({0, 1})] * 8) == 1


def test_world_size_cross_check():
    check_world_size(4, {"OMPI_COMM_WORLD_SIZE": "4"})
    check_world_size(1, {})
    with pytest.raises(UsageError, match="srun --mpi=pmix"):
        check_world_size(1, {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_ID": "0"})
    # mpirun inside an allocation: mpirun's variables win over the step's
    check_world_size(8, {"OMPI_COMM_WORLD_SIZE": "8", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_ID": "0"})


def test_bucket_plan():
    MB = 1 << 20
    # small first bucket, then up to the cap; a tensor larger than the cap stands alone
    assert plan_buckets([MB // 2, MB // 2, MB // 2, 30 * MB, MB], 25 * MB) == [[0, 1], [2], [3], [4]]
    assert plan_buckets([10] * 5, 25 * MB) == [[0, 1, 2, 3, 4]]
    assert plan_buckets([], 25 * MB) == []


def test_given_values_are_the_parsed_flags_and_the_config_file(tmp_path):
    from hpcaccel.config import given_values
    f = tmp_path / "run.toml"
    f.write_text('resume = "none"\nepochs = 3\n')
    values, path = given_values(["--out=o", "--config", str(f), "--epochs", "5"])
    assert values == {"out": "o", "resume": "none", "epochs": 5} and path == str(f)


def test_progress_auto_shows_the_bar_only_on_a_terminal(tmp_path):
    import io

    from hpcaccel.config import parse_args
    from hpcaccel.metrics import bar_wanted

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert parse_args([]).progress == "auto"
    assert bar_wanted("auto", Terminal()) and not bar_wanted("auto", io.StringIO())
    assert bar_wanted("true", io.StringIO()) and not bar_wanted("false", Terminal())
    toml = tmp_path / "run.toml"
    toml.write_text("progress = false\n")
    assert parse_args(["--config", str(toml)]).progress == "false"


@pytest.mark.parametrize("own,hint,launcher,want", [
    (True, None, None, True),     # typed in a terminal, or srun --pty
    (True, "0", False, True),     # its own terminal wins over a hint handed down
    (False, "1", None, True),     # scripts/mpirun.sh (make train) in a terminal
    (False, "0", True, False),    # scripts/mpirun.sh into a pipe or a Slurm log
    (False, None, True, True),    # Open MPI's mpirun in a terminal, on rank 0's host
    (False, None, False, False),  # mpirun into a pipe or file
    (False, None, None, False),   # srun, sbatch, another host: nothing says terminal
    (False, "yes", None, False),  # a hint that is not 0 or 1 says nothing
])
def test_progress_auto_decides_from_what_the_launcher_says(own, hint, launcher, want):
    from hpcaccel.terminal import decide
    assert decide(own, hint, launcher) is want


def test_mpirun_stderr_is_read_from_the_launching_process():
    """A stand-in launcher (bash) names its process id as Open MPI's session directory does;
    the process it starts reads the launcher's stderr: a terminal, a pipe, or (a process that
    did not start it) unknown."""
    import os
    import subprocess
    import sys

    from hpcaccel.terminal import mpirun_stderr_is_tty

    child = "import os; from hpcaccel.terminal import mpirun_stderr_is_tty; print(mpirun_stderr_is_tty(os.environ))"
    launcher = 'OMPI_MCA_orte_jobfam_session_dir=/tmp/ompi.h.0/pid.${PID:-$$} "$PY" -c "$CHILD" 2>/dev/null; true'

    def run(stderr, **env):
        return subprocess.run(["bash", "-c", launcher], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=stderr, text=True, timeout=60, check=True,
                              env={**os.environ, "PY": sys.executable, "CHILD": child, **env}).stdout.strip()

    master, slave = os.openpty()
    try:
        assert run(slave) == "True"
        assert run(subprocess.PIPE) == "False"
        with subprocess.Popen(["sleep", "30"], stderr=slave) as other:  # on a terminal, not ours
            assert run(slave, PID=str(other.pid)) == "None"
            other.kill()
    finally:
        os.close(master)
        os.close(slave)
    assert mpirun_stderr_is_tty({}) is None  # not started by Open MPI's mpirun
    assert mpirun_stderr_is_tty({"OMPI_MCA_orte_jobfam_session_dir": "/tmp/elsewhere"}) is None
