"""Sweep files (TOML, JSON, CSV) -> one config per array task; collect -> one table."""
import json
import sys

import pytest

from hpcaccel import slurm
from hpcaccel.slurm import sweep as slurm_sweep
from hpcaccel.config import parse_args
from hpcaccel.errors import UsageError

from hpcaccel.config import tomllib


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_toml_runs_then_grid_in_order(tmp_path):
    path = write(tmp_path, "s.toml", '[[run]]\nlr = 0.1\nmodel = "mlp"\n\n'
                 '[grid]\nlr = [0.05, 0.01]\nbatch-size = [16, 32]\n')
    assert slurm_sweep.load(path) == [
        {"lr": 0.1, "model": "mlp"},
        {"lr": 0.05, "batch_size": 16}, {"lr": 0.05, "batch_size": 32},
        {"lr": 0.01, "batch_size": 16}, {"lr": 0.01, "batch_size": 32}]


def test_json_list_and_csv_rows(tmp_path):
    assert slurm_sweep.load(write(tmp_path, "s.json", '[{"lr": 0.1}, {"optimizer": "adamw"}]')) == \
        [{"lr": 0.1}, {"optimizer": "adamw"}]
    rows = slurm_sweep.load(write(tmp_path, "s.csv", "lr,epochs,shuffle,model\n0.1,3,false,mlp\n0.2,4,true,cnn\n"))
    assert rows == [{"lr": 0.1, "epochs": 3, "shuffle": False, "model": "mlp"},
                    {"lr": 0.2, "epochs": 4, "shuffle": True, "model": "cnn"}]


@pytest.mark.parametrize("name,text,needle", [
    ("s.toml", "[[run]]\nout = 'x'\n", "entry 0: out cannot be swept"),
    ("s.toml", "[[run]]\nthreads = 2\n", "entry 0: threads cannot be swept"),
    ("s.toml", "[[run]]\nlr = 0.1\n[[run]]\nlearning_rate = 1\n", "entry 1: unknown key 'learning_rate'"),
    ("s.toml", "[grid]\nlr = 0.1\n", "grid.lr must be a non-empty list"),
    ("s.toml", "[sweep]\nlr = [1]\n", "expected [[run]] tables and/or a [grid] table"),
    ("s.toml", "lr = [", "cannot parse"),
    ("s.json", '[{"lr": [1, 2]}]', "entry 0: lr must be a string, number or boolean"),
    ("s.json", "[]", "no configurations"),
    ("s.json", "[1]", "entry 0: expected a table"),
    ("s.csv", "lr,colour\n0.1,red\n", "unknown column 'colour'"),
    ("s.csv", "epochs\nmany\n", "row 1, epochs: expected int, got 'many'"),
    ("s.yaml", "lr: 1", "expected a .toml, .json or .csv file"),
])
def test_bad_sweep_files(tmp_path, name, text, needle):
    with pytest.raises(UsageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        slurm_sweep.load(write(tmp_path, name, text))


def test_missing_sweep_file():
    with pytest.raises(UsageError, match="--sweep /nonexistent.toml: cannot read"):
        slurm_sweep.load("/nonexistent.toml")


def test_sweep_values_are_checked_like_train_flags(tmp_path, capsys):
    path = write(tmp_path, "s.toml", '[[run]]\nlr = 0.1\n[[run]]\nepochs = "ten"\n')
    assert slurm.main(["render", "sweep", "--sweep", path]) == 2
    err = capsys.readouterr().err
    assert f"--sweep {path}: entry 1:" in err and "epochs" in err


@pytest.mark.parametrize("value", [0.1, 1e-05, float("inf"), 3, True, False, "digits",
                                   'quote " back \\ slash\nnewline \u00e9 \x01'])
def test_entry_toml_round_trips_through_the_trainers_config(tmp_path, value):
    entries = [{"data": "digits"}, {"lr": value} if not isinstance(value, (bool, str))
               else {"shuffle": value} if isinstance(value, bool) else {"data": value}]
    text = slurm_sweep.entry_toml(entries, 1)
    assert tomllib.loads(text) == entries[1]
    if not isinstance(value, float) or value != float("inf"):
        path = tmp_path / "c.toml"
        path.write_text(text)
        cfg = parse_args(["--config", str(path)])
        key, want = next(iter(entries[1].items()))
        assert getattr(cfg, key) == want


def test_entry_index_outside_the_sweep():
    with pytest.raises(UsageError, match="index 2 outside the sweep"):
        slurm_sweep.entry_toml([{"lr": 1}, {"lr": 2}], 2)


def test_sweep_entry_command_reads_stdin(monkeypatch, capsys):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO('[{"lr": 0.5}, {"lr": 0.25, "model": "mlp"}]'))
    assert slurm.main(["sweep-entry", "-", "1"]) == 0
    assert capsys.readouterr().out == 'lr = 0.25\nmodel = "mlp"\n'


def make_sweep(tmp_path, done=(0, 2), stopped=(1,)):
    entries = [{"lr": 0.1}, {"lr": 0.05, "optimizer": "adamw"}, {"lr": 0.01}, {"lr": 0.001}]
    (tmp_path / "sweep.json").write_text(json.dumps(entries))
    for i in done:
        (tmp_path / f"task-{i}").mkdir()
        (tmp_path / f"task-{i}" / "summary.json").write_text(json.dumps(
            {"test_accuracy": 0.9 + i / 100, "final_train_loss": 0.123456, "steps": 44,
             "samples_per_second": 1000.0, "wall_seconds": 5.5, "config": entries[i]}))
    for i in stopped:
        (tmp_path / f"task-{i}" / "checkpoints").mkdir(parents=True)
    return entries


def test_collect_gives_one_row_per_task_with_status(tmp_path, capsys):
    make_sweep(tmp_path)
    assert slurm.main(["collect", str(tmp_path), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "task,lr,optimizer,status,test_accuracy,final_train_loss,steps,samples_per_second,wall_seconds",
        "0,0.1,,done,0.9,0.1235,44,1000,5.5",
        "1,0.05,adamw,stopped,,,,,",
        "2,0.01,,done,0.92,0.1235,44,1000,5.5",
        "3,0.001,,missing,,,,,"]
    assert "2 of 4 tasks have no summary.json: 1, 3" in err


def test_collect_markdown(tmp_path, capsys):
    make_sweep(tmp_path, done=(0, 1, 2, 3), stopped=())
    assert slurm.main(["collect", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("| task | lr | optimizer | status |") and lines[1].startswith("|---|")
    assert len(lines) == 2 + 4 and err == ""


def test_collect_without_sweep_json_uses_task_dirs(tmp_path):
    make_sweep(tmp_path, done=(0,), stopped=())
    (tmp_path / "sweep.json").unlink()
    columns, rows, _ = slurm_sweep.collect(str(tmp_path))
    assert [r["task"] for r in rows] == [0] and rows[0]["status"] == "done"


def test_collect_refuses_a_directory_that_is_not_a_sweep(tmp_path):
    with pytest.raises(UsageError, match="not a sweep directory"):
        slurm_sweep.collect(str(tmp_path))


def test_collect_shows_the_tasks_metrics_and_ranks_by_any_of_them(tmp_path, capsys):
    entries = [{"lr": 0.1}, {"lr": 0.05}, {"lr": 0.01}, {"lr": 0.001}]
    (tmp_path / "sweep.json").write_text(json.dumps(entries))
    for i, (rmse, r2) in enumerate([(0.9, 0.2), (0.7, 0.5), (0.8, 0.35)]):  # regress runs
        (tmp_path / f"task-{i}").mkdir()
        (tmp_path / f"task-{i}" / "summary.json").write_text(json.dumps(
            {"task": "regress", "test_accuracy": None, "test_loss": rmse ** 2, "test_rmse": rmse,
             "test_mae": rmse / 2, "test_r2": r2, "test_r2_per_output": [r2, r2],
             "final_train_loss": 0.5, "final_train_r2": r2 + 0.1, "steps": 10,
             "samples_per_second": 100.0, "wall_seconds": 3.0, "config": entries[i]}))
    assert slurm.main(["collect", str(tmp_path), "--format", "csv", "--rank-by", "test_r2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("task,lr,status,test_rmse,test_mae,test_r2,final_train_loss,steps,"
                        "samples_per_second,wall_seconds")  # no accuracy column: none has it
    assert [l.split(",")[0] for l in lines[1:]] == ["1", "2", "0", "3"]  # best R^2 first
    assert slurm.main(["collect", str(tmp_path), "--format", "csv", "--rank-by", "test_mae"]) == 0
    assert [l.split(",")[0] for l in capsys.readouterr().out.splitlines()[1:]] == ["1", "2", "0", "3"]
    assert slurm.main(["collect", str(tmp_path), "--format", "csv", "--rank-by", "test_mae",
                       "--order", "descending"]) == 0
    assert [l.split(",")[0] for l in capsys.readouterr().out.splitlines()[1:]] == ["0", "2", "1", "3"]
    # a metric outside the table joins it; one no summary has is one line, exit 2
    columns, rows, _ = slurm_sweep.collect(str(tmp_path), "final_train_r2")
    assert "final_train_r2" in columns and rows[0]["task"] == 1
    assert slurm.main(["collect", str(tmp_path), "--rank-by", "test_accuracy"]) == 2
    err = capsys.readouterr().err
    assert "--rank-by test_accuracy: no task's summary.json has it" in err and err.count("\n") == 1
