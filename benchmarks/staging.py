"""Node-local staging (--stage-dir) against reading in place, with a cold page cache.
Standalone (it launches its own mpirun jobs):

    python benchmarks/staging.py --dir /tmp/staging-bench [--np 2] [--repeats 2]

Packs a synthetic dataset once (default 8 shards of 131,072 x 1 KiB samples, 1 GiB), then,
per repeat, one epoch of a small MLP through the real CLI (--check-data false, so nothing
reads the files before the epoch does):

  in place       the shards dropped from the page cache, read where they are
  stage (copy)   the shards dropped, copied into a fresh --stage-dir, then read from there
                 (the copies were just written, so the epoch reads them from the page cache)
  staged, cold   the copies (and the shards) dropped, the copies reused and read

Drops are posix_fadvise(DONTNEED) after an fsync, checked with mincore (0 bytes left).
Prints one line per run and writes the numbers as JSON to DIR/staging.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from test_data_reader import drop_cache  # noqa: E402 - the benchmarks' one cache drop


def pack(directory, shards, per_shard, features):
    index = os.path.join(directory, "data", "index.json")
    if not os.path.exists(index):
        subprocess.run([sys.executable, "-m", "hpcaccel.data", "pack", "--source", "synthetic",
                        "--samples", str(shards * per_shard), "--shape", str(features),
                        "--shards", str(shards), "--out", os.path.dirname(index)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return index


def train(np_, index, out, stage_dir=None, batch=256):
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["bash", os.path.join(ROOT, "scripts", "mpirun.sh"), str(np_), sys.executable, "-m",
           "hpcaccel.train", "--data", index, "--model", "mlp", "--epochs", "1",
           "--batch-size", str(batch), "--threads", "1", "--check-data", "false",
           "--progress", "false", "--out", out]
    if stage_dir:
        cmd += ["--stage-dir", stage_dir]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"training failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    return {"epoch_seconds": s["train_seconds"],
            "data_wait_seconds": s["breakdown_seconds_max_over_ranks"]["data_wait"],
            "samples_per_second": s["samples_per_second"],
            "staging_seconds": (s.get("staging") or {}).get("seconds_max"),
            "bytes_copied": (s.get("staging") or {}).get("bytes_copied_per_host_max"),
            "job_wall_seconds": wall}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=131072)
    p.add_argument("--features", type=int, default=256)
    a = p.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    index = pack(a.dir, a.shards, a.per_shard, a.features)
    sources = sorted(glob.glob(os.path.join(os.path.dirname(index), "part-*.h5")))
    stage_dir, out = os.path.join(a.dir, "stage"), os.path.join(a.dir, "run")
    runs = []
    for repeat in range(a.repeats):
        for kind in ("in place", "stage (copy)", "staged, cold"):
            if kind == "stage (copy)":
                shutil.rmtree(stage_dir, ignore_errors=True)
            copies = glob.glob(os.path.join(stage_dir, "hpcaccel-*", "*.h5"))
            left = drop_cache(sources + copies)
            load = os.getloadavg()[0]
            got = train(a.np, index, out, stage_dir if kind != "in place" else None)
            got.update(kind=kind, repeat=repeat, resident_bytes_before=left, load_before=load)
            runs.append(got)
            print(f"{kind:13s} repeat {repeat}: epoch {got['epoch_seconds']:.2f} s, data wait "
                  f"{got['data_wait_seconds']:.2f} s, staging {got['staging_seconds'] or 0:.2f} s "
                  f"({(got['bytes_copied'] or 0) / 2**20:.0f} MiB), load {load:.1f}, "
                  f"{left} bytes cached before", flush=True)
    with open(os.path.join(a.dir, "staging.json"), "w") as fh:
        json.dump({"np": a.np, "shards": a.shards, "per_shard": a.per_shard,
                   "features": a.features, "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()
