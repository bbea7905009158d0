"""Sweeps: read a sweep file into one training configuration per array task, write a task's
configuration as TOML (what `python -m hpcaccel.train --config` reads), and collect every
task's summary.json into one table.

A sweep file lists configurations with the keys of `python -m hpcaccel.train --config`:
  TOML  [[run]] tables, and/or a [grid] table of lists (every combination, in order)
  JSON  a list of objects, or {"run": [...], "grid": {...}}
  CSV   a header of keys, one row per configuration (values typed by the flag's type)
Task i of the array trains entry i.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re

from ..config import tomllib
from ..errors import UsageError

# keys a sweep entry may not set: the template owns them
FORBIDDEN = {
    "out": "each task writes to SWEEP_DIR/task-i (set --set sweep_dir=DIR)",
    "resume": "tasks resume with --resume auto after a requeue",
    "threads": "threads come from --set cpus_per_rank=N",
    "config": "an entry is itself a config",
}
# summary.json fields shown by `collect`, after the swept keys; the task's other test metrics
# (test_rmse, test_r2, test_mean_iou, a custom task's) follow test_accuracy where present
METRICS = ("test_accuracy", "final_train_loss", "steps", "samples_per_second", "wall_seconds")
# --rank-by: these metrics are better lower (losses, errors, times); all others higher
LOWER_IS_BETTER = re.compile(r"loss|rmse|mae|error|seconds")


def _fields() -> dict:
    from ..config import TrainConfig
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def load(path: str) -> list[dict]:
    """The sweep file's configurations, checked against the training flags."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise UsageError(f"--sweep {path}: cannot read: {e.strerror}") from None
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            entries = _from_mapping(tomllib.loads(raw.decode()), path)
        elif ext == ".json":
            data = json.loads(raw)
            entries = data if isinstance(data, list) else _from_mapping(data, path)
        elif ext == ".csv":
            entries = _from_csv(raw.decode(), path)
        else:
            raise UsageError(f"--sweep {path}: expected a .toml, .json or .csv file")
    except (UnicodeDecodeError, ValueError) as e:  # TOMLDecodeError, JSONDecodeError
        raise UsageError(f"--sweep {path}: cannot parse: {e}") from None
    if not entries:
        raise UsageError(f"--sweep {path}: no configurations")
    return [check_entry(e, f"--sweep {path}: entry {i}") for i, e in enumerate(entries)]


def _from_mapping(data: dict, path: str) -> list:
    unknown = set(data) - {"run", "grid"}
    if unknown or not isinstance(data.get("run", []), list) or not isinstance(data.get("grid", {}), dict):
        raise UsageError(f"--sweep {path}: expected [[run]] tables and/or a [grid] table of lists")
    entries = list(data.get("run", []))
    grid = data.get("grid", {})
    if grid:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise UsageError(f"--sweep {path}: grid.{key} must be a non-empty list")
        keys = list(grid)
        entries += [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]
    return entries


def _from_csv(text: str, path: str) -> list:
    rows = list(csv.DictReader(io.StringIO(text)))
    fields = _fields()
    entries = []
    for n, row in enumerate(rows):
        entry = {}
        for key, value in row.items():
            name = (key or "").strip().replace("-", "_")
            if name not in fields:
                raise UsageError(f"--sweep {path}: unknown column {key!r}")
            entry[name] = _typed(value.strip(), fields[name], f"--sweep {path}: row {n + 1}, {key}")
        entries.append(entry)
    return entries


def _typed(text: str, f, where: str):
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if "bool" in kind:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if "int" in kind:
            return int(text)
        if "float" in kind:
            return float(text)
    except ValueError:
        raise UsageError(f"{where}: expected {kind}, got {text!r}") from None
    return text


def check_entry(entry, where: str) -> dict:
    """Keys must be training flags (as in --config files, - or _), values TOML scalars."""
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected a table of flag values")
    fields, out = _fields(), {}
    for key, value in entry.items():
        name = str(key).replace("-", "_")
        if name in FORBIDDEN:
            raise UsageError(f"{where}: {key} cannot be swept: {FORBIDDEN[name]}")
        if name not in fields:
            raise UsageError(f"{where}: unknown key {key!r} (keys are python -m hpcaccel.train flags)")
        if not isinstance(value, (str, int, float, bool)):
            raise UsageError(f"{where}: {key} must be a string, number or boolean")
        out[name] = value
    return out


def entry_toml(entries: list, index: int) -> str:
    """Entry `index` as a TOML config file."""
    if not 0 <= index < len(entries):
        raise UsageError(f"sweep-entry: index {index} outside the sweep (0 to {len(entries) - 1})")
    entry = check_entry(entries[index], f"sweep entry {index}")
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in entry.items())


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


# --- collect -----------------------------------------------------------------------------

def collect(sweep_dir: str, rank_by: str | None = None,
            order: str = "auto") -> tuple[list[str], list[dict], list[str]]:
    """(columns, one row per task, notes). Tasks without summary.json are listed as
    `stopped` (checkpoints, no summary yet) or `missing`. `rank_by`: a metric of the
    summaries (any scalar key, e.g. test_r2); rows are sorted by it, best first (`order`
    auto: lower is better for losses, errors and times, higher for the rest; or ascending,
    descending), tasks without it last."""
    if not os.path.isdir(sweep_dir):
        raise UsageError(f"collect {sweep_dir}: no such directory")
    entries = None
    try:
        with open(os.path.join(sweep_dir, "sweep.json")) as fh:
            entries = json.load(fh)
    except (OSError, ValueError):
        pass
    found = {int(m.group(1)) for d in os.listdir(sweep_dir) if (m := re.fullmatch(r"task-(\d+)", d))}
    if entries is None and not found:
        raise UsageError(f"collect {sweep_dir}: not a sweep directory (no sweep.json, no task-N)")
    tasks = sorted(found | set(range(len(entries or []))))
    swept = list(dict.fromkeys(k for e in entries or [] for k in e))
    rows, notes, summaries = [], [], {}
    for i in tasks:
        task_dir = os.path.join(sweep_dir, f"task-{i}")
        row = {"task": i}
        if entries is not None and i < len(entries):
            row.update({k: entries[i].get(k, "") for k in swept})
        try:
            with open(os.path.join(task_dir, "summary.json")) as fh:
                summary = json.load(fh)
            row["status"] = "done"
            summaries[i] = summary
            if entries is None:  # no sweep.json: show the resolved config's values
                row.update({k: summary.get("config", {}).get(k) for k in swept})
        except (OSError, ValueError):
            stopped = os.path.isdir(os.path.join(task_dir, "checkpoints"))
            row["status"] = "stopped" if stopped else "missing"
        rows.append(row)
    metrics = metric_columns(list(summaries.values()), rank_by)
    for row in rows:
        if row["task"] in summaries:
            row.update({k: summaries[row["task"]].get(k) for k in metrics})
    pending = [str(r["task"]) for r in rows if r["status"] != "done"]
    if pending:
        notes.append(f"{len(pending)} of {len(rows)} tasks have no summary.json: {', '.join(pending)}")
    if rank_by:
        rows = ranked(rows, rank_by, order)
    return ["task", *swept, "status", *metrics], rows, notes


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_columns(summaries: list[dict], rank_by: str | None = None) -> list[str]:
    """METRICS with the tasks' own test metrics after test_accuracy (which stays where some
    summary has it, or where there is no other), and `rank_by` wherever it is missing."""
    extra = list(dict.fromkeys(k for s in summaries for k, v in s.items() if k.startswith("test_")
                               and k not in ("test_loss", "test_accuracy") and _scalar(v)))
    accuracy = ["test_accuracy"] if any(s.get("test_accuracy") is not None for s in summaries) \
        or not extra else []
    columns = accuracy + extra + [m for m in METRICS if m != "test_accuracy"]
    if rank_by and rank_by not in columns:
        if not any(_scalar(s.get(rank_by)) for s in summaries):
            known = sorted({k for s in summaries for k, v in s.items() if _scalar(v)})
            raise UsageError(f"collect --rank-by {rank_by}: no task's summary.json has it as a "
                             f"number (metrics: {', '.join(known) or 'none yet'})")
        columns.insert(len(accuracy) + len(extra), rank_by)
    return columns


def ranked(rows: list[dict], metric: str, order: str = "auto") -> list[dict]:
    """Rows sorted by `metric`, best first; rows without it keep their order, last."""
    if order == "auto":
        order = "ascending" if LOWER_IS_BETTER.search(metric) else "descending"
    scored = [r for r in rows if _scalar(r.get(metric)) and math.isfinite(r[metric])]
    rest = [r for r in rows if r not in scored]
    return sorted(scored, key=lambda r: r[metric], reverse=order == "descending") + rest


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(columns: list, rows: list, fmt: str = "md") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_cell(r.get(c)) for c in columns] for r in rows])
        return buf.getvalue()
    cells = [[_cell(r.get(c)).replace("|", "\\|") for c in columns] for r in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"
