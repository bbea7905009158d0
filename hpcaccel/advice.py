"""Start-up warnings where a run would go on but its results would be silently bad: one line
each, from rank 0, before training. Pure functions of what set-up already knows (the data
scan's statistics, the flags the user gave, the backend in use); train.py prints them.
"""
from __future__ import annotations

# Flags that only one backend reads: given to the other, they do nothing.
BACKEND_ONLY = {"fusion_mb": "horovod", "cycle_time_ms": "horovod",
                "bucket_mb": "mpi", "allreduce": "mpi"}


def flag_warnings(given: dict, backend: str) -> list[str]:
    """`given`: the fields the user set (config.given_values); `backend`: the one in use."""
    lines = []
    for name, owner in BACKEND_ONLY.items():
        if name in given and owner != backend:
            flag = "--" + name.replace("_", "-")
            lines.append(f"{flag} {given[name]} is for the {owner} backend only and does nothing "
                         f"with the {backend} backend (add --backend {owner}, or drop it)")
    return lines


def task_warnings(task: str, target, where: str) -> list[str]:
    """`task`: the task's name; `target`: what y holds (data.Target); `where`: "--data PATH"."""
    if task == "regress" and target.integer:
        fits = "segment" if target.shape else "classify"
        return [f"--task regress on {where}: y holds {target.describe()}; regression treats "
                f"the label numbers as quantities (class 7 as more than class 3), which rarely "
                f"learns and can diverge; --task {fits} (or auto) learns the classes"]
    return []


def merge_stats(per_rank: list[dict]) -> dict:
    """The data scan's per-rank statistics (hdf5.scan) as one: the smallest label over all
    ranks, float targets' count, sum and sum of squares added up, x's from the first rank
    that saw samples."""
    labels = [s["min_label"] for s in per_rank if s.get("min_label") is not None]
    first_x = next((s for s in per_rank if "x_min" in s), {})
    merged = {"min_label": min(labels) if labels else None,
              **{k: first_x[k] for k in ("x_integer", "x_whole", "x_min", "x_max") if k in first_x}}
    if any("y_count" in s for s in per_rank):
        merged.update({k: sum(s.get(k, 0) for s in per_rank) for k in ("y_count", "y_sum", "y_sumsq")})
    return merged


# Float targets whose root mean square exceeds this give losses of its square and gradients
# that the default --lr of 0.05 cannot take.
TARGET_RMS_WARN = 100.0


def data_warnings(stats: dict, classes: int, flag: str, path: str) -> list[str]:
    lines = []
    integer = stats.get("x_integer") or (stats.get("x_whole") and stats.get("x_max", 0) > 1)
    if integer:
        lines.append(f"{flag} {path}: x holds whole numbers from {stats['x_min']:g} to "
                     f"{stats['x_max']:g} (unscaled integer data: expect huge losses); scale "
                     f"it, e.g. pack 8-bit images with `python -m hpcaccel.data pack "
                     f"--normalize` (into [0, 1])")
    if stats.get("y_count"):
        mean = stats["y_sum"] / stats["y_count"]
        rms = (stats["y_sumsq"] / stats["y_count"]) ** 0.5
        if rms > TARGET_RMS_WARN:
            spread = max(0.0, rms * rms - mean * mean) ** 0.5
            lines.append(f"{flag} {path}: the float targets have mean {mean:.4g} and standard "
                         f"deviation {spread:.4g} (losses of about {rms * rms:.3g} at the start, "
                         f"large gradients); standardise them (subtract the mean, divide by the "
                         f"standard deviation) before packing, or lower --lr")
    low = stats.get("min_label")
    if low is not None and low >= 1:
        lines.append(f"{flag} {path}: no sample has label 0 (labels start at {low}), so the "
                     f"model has {classes} outputs with class{'es 0 to ' + str(low - 1) if low > 1 else ' 0'}"
                     f" never seen; repack with `python -m hpcaccel.data pack ... --label-offset {low}` "
                     f"to start them at 0")
    return lines
