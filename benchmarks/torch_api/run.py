"""Your own script on hpcaccel.torch against real Horovod and torch DDP, side by side in one
run (issue 23, item 5). Every variant runs in MPI jobs of its own (Horovod's background
thread keeps polling from hvd.init until its process exits and would slow anything beside
it), and the repeats are interleaved: repeat r runs every variant once, in an order rotated
by r, so a change of load hits all of them alike.

  train       hvd_train.py, one Horovod script, run (a) with real Horovod, (b) unchanged
              through `python -m hpcaccel.horovod` (hpcaccel.torch); (c) the same model and
              data under torch DDP over gloo (ddp_train.py). Models: mlp25m, cnn8m
              (bench_models.py); samples/s over the timed steps after warm-up.
  allreduce   what one hvd.allreduce costs (4 B, 4 KiB, 4 MiB), hpcaccel.torch with and
              without its per-call agreement check beside a bare mpi4py Allreduce, and real
              Horovod (allreduce_calls.py).

    python benchmarks/torch_api/run.py                    # one host, 2 ranks (scripts/mpirun.sh)
    python benchmarks/torch_api/run.py --hosts            # 1 rank on every emulated host
                                                          # (scripts/hosts.sh up first)

Writes benchmarks/results/ (HPCACCEL_BENCH_OUT): torch-api-train-<model>-<H>x<L>-np<N>.json
and torch-api-allreduce-<H>x<L>-np<N>.json, read by `python -m hpcaccel.bench report`.
HPCACCEL_BENCH_SMOKE=1 (or --smoke): every job once at tiny sizes, so the benchmark keeps
working (make test-bench-smoke, which writes to build/bench-smoke). Records, never asserts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
TRAIN = ("hpcaccel.torch", "Horovod", "torch DDP gloo")


def python() -> str:
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.access(venv, os.X_OK) else sys.executable


def summary(values: list[float]) -> dict:
    """mean, sample standard deviation, min, max and the 95% interval (Student t)."""
    mean = statistics.fmean(values)
    out = {"mean": mean, "min": min(values), "max": max(values), "values": values,
           "stdev": None, "ci95": None}
    if len(values) > 1:
        sd = statistics.stdev(values)
        half = T95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))
        out.update(stdev=sd, ci95=[mean - half, mean + half])
    return out


class Jobs:
    """Launches one MPI job per call: on this host (scripts/mpirun.sh NP) or with one rank
    on every emulated host (scripts/hosts.sh run 1)."""

    def __init__(self, args):
        self.args = args
        self.work = os.path.join(ROOT, "build", "torch-api")
        os.makedirs(self.work, exist_ok=True)
        self.count = 0

    def prefix(self) -> list[str]:
        if self.args.hosts:
            return ["bash", os.path.join(ROOT, "scripts", "hosts.sh"), "run", "1",
                    "--timeout", str(self.args.job_timeout)]
        return ["timeout", "--signal=TERM", "--kill-after=15", str(self.args.job_timeout),
                "bash", os.path.join(ROOT, "scripts", "mpirun.sh"), str(self.args.np)]

    def run(self, label: str, command: list[str]) -> dict:
        """Run `command` (python and its arguments) as a job; its rank 0 writes the JSON
        returned here. A failed job ends the benchmark with its output."""
        self.count += 1
        out = os.path.join(self.work, f"job{self.count}.json")
        log = os.path.join(self.work, f"job{self.count}.log")
        if os.path.exists(out):
            os.remove(out)
        full = self.prefix() + command + ["--out", out]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            rc = subprocess.call(full, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        wall = time.perf_counter() - t0
        if rc != 0 or not os.path.exists(out):
            with open(log) as fh:
                tail = fh.read()[-4000:]
            raise SystemExit(f"torch_api: {label} failed (exit {rc}): {shlex.join(full)}\n{tail}")
        with open(out) as fh:
            data = json.load(fh)
        data.update(load_before=load, job_seconds=wall)
        return data


def horovod_available(py: str) -> str | None:
    """None where `import horovod.torch` works, else why not."""
    r = subprocess.run([py, "-c", "import horovod.torch"], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


def rotated(names, r: int) -> list:
    names = list(names)
    k = r % len(names)
    return names[k:] + names[:k]


def paired_ratios(a: list[float], b: list[float]) -> dict | None:
    """a[i] / b[i] for the repeats both ran in (same repeat, same load)."""
    ratios = [x / y for x, y in zip(a, b) if y]
    return summary(ratios) if ratios else None


def machine(extra: dict) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mpi = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout
    return {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "mpi": (mpi.splitlines() or [""])[0], **extra}


def record(out_dir: str, name: str, ranks: int, data: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-np{ranks}.json")
    with open(path, "w") as fh:
        json.dump({"benchmark": name, "ranks": ranks, **data}, fh, indent=1)
    return path


def bench_train(args, jobs: Jobs, py: str, variants: list[str]) -> list[str]:
    script = os.path.join(HERE, "hvd_train.py")
    commands = {"Horovod": [py, script],
                "hpcaccel.torch": [py, "-m", "hpcaccel.horovod", script],
                "torch DDP gloo": [py, os.path.join(HERE, "ddp_train.py")]}
    runs = {m: {v: [] for v in variants} for m in args.models}
    for r in range(args.repeats):
        for model in args.models:
            for v in rotated(variants, r):
                common = ["--model", model, "--batch", str(args.batch), "--warmup",
                          str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
                d = jobs.run(f"{v} {model} (repeat {r + 1})", commands[v] + common)
                runs[model][v].append(d)
                ph = " / ".join(f"{s * 1e3:.0f}" for s in d["phase_seconds"].values())
                print(f"  repeat {r + 1} {model:7s} {v:15s} {d['samples_per_second']:8.1f} samples/s "
                      f"(forward / backward / step {ph} ms; load {d['load_before']:.1f})", flush=True)
    written = []
    for model, per in runs.items():
        size = next(iter(per.values()))[0]["size"]
        layout = f"{size}x1" if args.hosts else f"1x{size}"
        rates = {v: [d["samples_per_second"] for d in ds] for v, ds in per.items()}
        results = {v: {"samples_per_second": summary(rates[v]),
                       # the same from each job's median step (rank 0's): a load spike that
                       # stalls a few steps of one job moves it less than the mean over steps
                       "samples_per_second_median_step": summary(
                           [args.batch * size / statistics.median(d["step_seconds"]) for d in ds]),
                       "median_step_seconds": summary([statistics.median(d["step_seconds"]) for d in ds]),
                       # rank 0's median forward / backward / step (step waits for the
                       # allreduces on hpcaccel.torch and Horovod; DDP waits in backward)
                       "phase_seconds": {k: summary([d["phase_seconds"][k] for d in ds])
                                         for k in ds[0]["phase_seconds"]},
                       "load_before": [d["load_before"] for d in ds],
                       "last_loss": [d["last_loss"] for d in ds],
                       "parameter_checksum": [d["parameter_checksum"] for d in ds]}
                   for v, ds in per.items()}
        ratios, median_ratios = {}, {}
        for other in ("Horovod", "torch DDP gloo"):
            if other in rates and "hpcaccel.torch" in rates:
                ratios[f"hpcaccel.torch / {other}"] = paired_ratios(rates["hpcaccel.torch"], rates[other])
                median_ratios[f"hpcaccel.torch / {other}"] = paired_ratios(
                    results["hpcaccel.torch"]["samples_per_second_median_step"]["values"],
                    results[other]["samples_per_second_median_step"]["values"])
        sums = [c for v in results.values() for c in v["parameter_checksum"]]
        same = max(abs(c - sums[0]) for c in sums) <= 1e-6 * max(1.0, abs(sums[0]))
        first = next(iter(per.values()))[0]
        data = {"model": model, "layout": layout, "hosts": size if args.hosts else 1,
                "ranks_per_host": 1 if args.hosts else size, "link_gbit": args.link_gbit,
                "batch_per_rank": args.batch, "warmup": args.warmup, "steps": args.steps,
                "repeats": args.repeats, "threads_per_rank": args.threads,
                "variants_in_order": variants, "results": results, "ratios": ratios,
                "ratios_median_step": median_ratios,
                "same_final_parameters": same,
                "machine": machine({"torch": first["torch"]})}
        written.append(record(args.out, f"torch-api-train-{model}-{layout}", size, data))
        print(f"{model} at {layout}: " + ", ".join(
            f"{v} {results[v]['samples_per_second']['mean']:.1f}" for v in variants) +
            "; " + ", ".join(f"{k} {s['mean']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
                             for k, s in ratios.items() if s) +
            "; from median steps: " + ", ".join(f"{k} {s['mean']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
                                                for k, s in median_ratios.items() if s) +
            f"; same final parameters in every variant: {same}", flush=True)
    return written


def bench_allreduce(args, jobs: Jobs, py: str, apis: list[str]) -> list[str]:
    script = os.path.join(HERE, "allreduce_calls.py")
    per_job: dict[str, dict[str, list[float]]] = {}  # impl -> bytes -> median per job
    size = None
    for r in range(args.allreduce_repeats):
        for api in rotated(apis, r):
            d = jobs.run(f"allreduce {api} (repeat {r + 1})",
                         [py, script, "--api", api, "--loops", str(args.loops),
                          "--small-calls", str(args.small_calls), "--large-calls", str(args.large_calls)])
            size = d["size"]
            for impl, by_size in d["seconds_per_call"].items():
                for nbytes, loops in by_size.items():
                    per_job.setdefault(impl, {}).setdefault(nbytes, []).append(statistics.median(loops))
            print(f"  repeat {r + 1} allreduce --api {api} done (load {d['load_before']:.1f})", flush=True)
    layout = f"{size}x1" if args.hosts else f"1x{size}"
    results = {impl: {n: summary(v) for n, v in by_size.items()} for impl, by_size in per_job.items()}
    check = {}
    if "hpcaccel.torch" in per_job and "hpcaccel.torch, check skipped" in per_job:
        for n in per_job["hpcaccel.torch"]:
            check[n] = summary([a - b for a, b in zip(per_job["hpcaccel.torch"][n],
                                                      per_job["hpcaccel.torch, check skipped"][n])])
    data = {"layout": layout, "repeats": args.allreduce_repeats, "loops_per_job": args.loops,
            "calls_per_loop": {"small": args.small_calls, "large": args.large_calls},
            "statistic": "seconds per call: median of a job's loops (each the slowest rank's), "
                         "summarised over jobs",
            "results": results, "check_seconds_per_call": check, "machine": machine({})}
    written = [record(args.out, f"torch-api-allreduce-{layout}", size, data)]
    for impl, by_size in results.items():
        print(f"  {impl:32s} " + "  ".join(f"{int(n):>8d} B {s['mean'] * 1e6:9.1f} us"
                                            for n, s in by_size.items()), flush=True)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", action="store_true", help="one rank on every emulated host "
                   "(scripts/hosts.sh run 1) instead of --np ranks on this host")
    p.add_argument("--np", type=int, default=2, help="ranks on this host (default 2)")
    p.add_argument("--parts", default="train,allreduce")
    p.add_argument("--models", default="mlp25m,cnn8m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on one "
                   "host, 10 across hosts)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("HPCACCEL_BENCH_THREADS", "1")))
    p.add_argument("--allreduce-repeats", type=int, default=3)
    p.add_argument("--loops", type=int, default=7)
    p.add_argument("--small-calls", type=int, default=300)
    p.add_argument("--large-calls", type=int, default=20)
    p.add_argument("--job-timeout", type=int, default=900, help="seconds per MPI job")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("HPCACCEL_BENCH_SMOKE") == "1")
    p.add_argument("--out", default=os.environ.get("HPCACCEL_BENCH_OUT",
                                                   os.path.join(ROOT, "benchmarks", "results")))
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    parts = set(args.parts.split(","))
    link = os.environ.get("HPCACCEL_BENCH_LINK_GBIT")
    args.link_gbit = float(link) if link and args.hosts else None
    if args.steps is None:
        args.steps = 10 if args.hosts else 20
    if args.smoke:  # keeps the benchmark working: every job once, tiny, numbers meaningless
        args.models, args.repeats, args.batch, args.warmup, args.steps = ["mlp25m"], 1, 4, 1, 2
        args.allreduce_repeats, args.loops, args.small_calls, args.large_calls = 1, 1, 5, 2
    py = python()
    variants = list(TRAIN)
    why = horovod_available(py)
    if why:
        variants.remove("Horovod")
        print(f"torch_api: real Horovod is not importable ({why}); measuring without it", flush=True)
    jobs = Jobs(args)
    where = "emulated hosts x 1 rank" if args.hosts else f"{args.np} ranks on this host"
    written = []
    if "train" in parts:
        print(f"== training, {where}: {', '.join(variants)}; {args.repeats} interleaved repeats "
              f"of {args.steps} steps after {args.warmup}, {args.batch} samples per rank", flush=True)
        written += bench_train(args, jobs, py, variants)
    if "allreduce" in parts:
        print(f"== hvd.allreduce per call, {where}", flush=True)
        written += bench_allreduce(args, jobs, py, ["hpcaccel"] + (["horovod"] if "Horovod" in variants else []))
    for path in written:
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
