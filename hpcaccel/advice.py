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


def merge_stats(per_rank: list[dict]) -> dict:
    """The data scan's per-rank statistics (hdf5.scan) as one: the smallest label over all
    ranks, x's from the first rank that saw samples."""
    labels = [s["min_label"] for s in per_rank if s.get("min_label") is not None]
    first_x = next((s for s in per_rank if "x_min" in s), {})
    return {"min_label": min(labels) if labels else None,
            **{k: first_x[k] for k in ("x_integer", "x_whole", "x_min", "x_max") if k in first_x}}


def data_warnings(stats: dict, classes: int, flag: str, path: str) -> list[str]:
    lines = []
    integer = stats.get("x_integer") or (stats.get("x_whole") and stats.get("x_max", 0) > 1)
    if integer:
        lines.append(f"{flag} {path}: x holds whole numbers from {stats['x_min']:g} to "
                     f"{stats['x_max']:g} (unscaled integer data: expect huge losses); scale "
                     f"it, e.g. pack 8-bit images with `python -m hpcaccel.data pack "
                     f"--normalize` (into [0, 1])")
    low = stats.get("min_label")
    if low is not None and low >= 1:
        lines.append(f"{flag} {path}: no sample has label 0 (labels start at {low}), so the "
                     f"model has {classes} outputs with class{'es 0 to ' + str(low - 1) if low > 1 else ' 0'}"
                     f" never seen; repack with `python -m hpcaccel.data pack ... --label-offset {low}` "
                     f"to start them at 0")
    return lines
