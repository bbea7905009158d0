"""ZeRO-style sharding (--shard none | optimizer | gradients, mpi backend) side by side in one
run: memory, optimizer-step time and throughput, across hosts, and how much of the
parameter allgather hides under the next forward. Every job is an MPI job of its own
(shard_train.py: hpcaccel's Trainer on the mpi reducer, or torch DDP over gloo); repeats are
interleaved, repeat r running every variant once in an order rotated by r.

  memory    the 25M MLP with AdamW at 1, 2 and 4 ranks (4 oversubscribes 2 cores: fine for
            memory): per rank, model-state bytes from the tensors (parameters, gradient
            buffers held, optimizer state) and peak resident memory (VmHWM after the steps,
            minus VmHWM right before the model was built, and the total). At 1 rank the
            reducer has nothing to shard (no buckets): the three variants are the same.
  train     one host, 2 ranks: none / optimizer / gradients / torch DDP (gloo) on the 19M
            MLP (3072-2048x4-10), the 25M MLP and the built-in CNN, 64 samples per rank:
            samples/s and the optimizer-step span per rank (median over the timed steps).
  hosts     2 emulated hosts x 1 rank (scripts/hosts.sh, links shaped to --rate; root
            only, a hosts instance of its own, always taken down by name): the 19M MLP,
            none / optimizer / gradients / DDP, samples/s against the link bound
            1 / (compute + gradient bytes / link rate), compute measured by a 1-rank job
            of the same model and batch; then one sharded run with --timeline, and from
            it the fraction of allgather time that overlapped the next forward (and the
            part of it the forward spent waiting for that allgather).

    python benchmarks/sharding/run.py                   # memory, train, hosts (if root)
    python benchmarks/sharding/run.py --parts hosts

Writes benchmarks/results/ (HPCACCEL_BENCH_OUT): shard-memory-mlp25m-np<N>.json,
shard-train-<model>-1x2-np2.json, shard-train-mlp19m-2x1-np2.json and
shard-timeline-mlp19m-2x1-np2.json (+ the Chrome trace, traces/shard-timeline-mlp19m-2x1.json).
HPCACCEL_BENCH_SMOKE=1 (or --smoke): the four train jobs once at tiny sizes (each measures
memory too), numbers meaningless, no hosts (make test-bench-smoke). Records, never asserts.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
_spec = importlib.util.spec_from_file_location("torch_api_run", os.path.join(ROOT, "benchmarks", "torch_api", "run.py"))
ta = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ta)  # summary, Jobs, machine, rotated, paired_ratios, record

SHARDS = ("none", "optimizer", "gradients")
TRAIN = SHARDS + ("ddp",)
LABEL = {"none": "--shard none", "optimizer": "--shard optimizer",
         "gradients": "--shard gradients", "ddp": "torch DDP gloo"}


class Jobs(ta.Jobs):
    def __init__(self, args, np_=2, hosts=False):
        self.args = argparse.Namespace(**{**vars(args), "np": np_, "hosts": hosts})
        self.work = os.path.join(ROOT, "build", "sharding")
        os.makedirs(self.work, exist_ok=True)
        self.count = 0


def script(py, variant, model, batch, warmup, steps, threads, extra=()) -> list[str]:
    return [py, os.path.join(HERE, "shard_train.py"), "--variant", variant, "--model", model,
            "--batch", str(batch), "--warmup", str(warmup), "--steps", str(steps),
            "--threads", str(threads), *extra]


def mib(n) -> float:
    return n / 2**20


def bench_memory(args, py) -> list[str]:
    written = []
    for np_ in args.memory_np:
        jobs = Jobs(args, np_)
        per = {}
        for v in SHARDS:
            d = jobs.run(f"memory {v} at {np_}", script(py, v, args.memory_model, args.batch, 1,
                                                        args.memory_steps, args.threads))
            per[v] = d
            for r in d["per_rank"]:
                m = r["memory"]
                print(f"  {np_} ranks {LABEL[v]:18s} rank {r['rank']}: params {mib(m['parameters']):6.1f} "
                      f"grads {mib(m['gradients']):6.1f} optimizer {mib(m['optimizer_state']):6.1f} "
                      f"= {mib(m['total']):6.1f} MiB; VmHWM +{mib(m['vmhwm_delta']):6.1f} "
                      f"(total {mib(m['vmhwm']):6.1f}) MiB", flush=True)
        data = {"model": args.memory_model, "parameters": per["none"]["parameters"], "optimizer": "AdamW",
                "batch_per_rank": args.batch, "steps_before_measuring": 1 + args.memory_steps,
                "units": "bytes", "threads_per_rank": args.threads,
                "note": "model-state bytes counted from the tensors, each storage once; vmhwm_delta = "
                        "VmHWM after the steps - VmHWM right before the model was built",
                "results": {v: {"per_rank": [{"rank": r["rank"], **r["memory"]} for r in d["per_rank"]],
                                "reducer": d["reducer"], "bucket_bytes": d["bucket_bytes"]}
                            for v, d in per.items()},
                "machine": ta.machine({"torch": per["none"]["torch"]})}
        written.append(ta.record(args.out, f"shard-memory-{args.memory_model}", np_, data))
    return written


def train_results(runs: dict, batch: int) -> dict:
    out = {}
    for v, ds in runs.items():
        size = ds[0]["size"]
        out[LABEL[v]] = {
            "samples_per_second": ta.summary([d["samples_per_second"] for d in ds]),
            "samples_per_second_median_step": ta.summary(
                [batch * size / statistics.median(max(r["step_seconds"][i] for r in d["per_rank"])
                                                 for i in range(len(d["per_rank"][0]["step_seconds"])))
                 for d in ds]),
            # per rank: the median optimizer-step span of each job, summarised over jobs
            "step_span_seconds_per_rank": [ta.summary([d["per_rank"][k]["step_span_median"] for d in ds])
                                           for k in range(size)],
            **({"compute_seconds_per_step_max_rank": ta.summary(
                [max(r["compute_per_step"] for r in d["per_rank"]) for d in ds])}
               if "compute_per_step" in ds[0]["per_rank"][0] else {}),
            "optimizer_state_bytes_per_rank": [r["memory"]["optimizer_state"] for r in ds[0]["per_rank"]],
            "load_before": [d["load_before"] for d in ds],
            "parameter_checksum": [d["parameter_checksum"] for d in ds],
            "reducer": ds[0]["reducer"], "bucket_bytes": ds[0]["bucket_bytes"]}
    return out


def ratios(results: dict, key: str = "samples_per_second") -> dict:
    base = results.get(LABEL["none"])
    out = {}
    for v in ("optimizer", "gradients", "ddp"):
        if LABEL[v] in results and base:
            out[f"{LABEL[v]} / --shard none"] = ta.paired_ratios(
                results[LABEL[v]][key]["values"], base[key]["values"])
    return out


def run_train(args, jobs, py, model, steps, warmup) -> dict:
    runs = {v: [] for v in TRAIN}
    for r in range(args.repeats):
        for v in ta.rotated(TRAIN, r):
            d = jobs.run(f"{v} {model} (repeat {r + 1})",
                         script(py, v, model, args.batch, warmup, steps, args.threads))
            runs[v].append(d)
            spans = " / ".join(f"{x['step_span_median'] * 1e3:.0f}" for x in d["per_rank"])
            print(f"  repeat {r + 1} {model:6s} {LABEL[v]:18s} {d['samples_per_second']:7.1f} samples/s, "
                  f"step span per rank {spans} ms (load {d['load_before']:.1f})", flush=True)
    return runs


def bench_train(args, py) -> list[str]:
    jobs = Jobs(args, 2)
    written = []
    for model in args.models:
        runs = run_train(args, jobs, py, model, args.steps, args.warmup)
        results = train_results(runs, args.batch)
        sums = [c for v in results.values() for c in v["parameter_checksum"]]
        data = {"model": model, "parameters": runs["none"][0]["parameters"], "layout": "1x2",
                "optimizer": "AdamW", "batch_per_rank": args.batch, "warmup": args.warmup,
                "steps": args.steps, "repeats": args.repeats, "threads_per_rank": args.threads,
                "results": results, "ratios": ratios(results),
                "ratios_median_step": ratios(results, "samples_per_second_median_step"),
                "checksum_spread": max(sums) - min(sums),
                "machine": ta.machine({"torch": runs["none"][0]["torch"]})}
        written.append(ta.record(args.out, f"shard-train-{model}-1x2", 2, data))
        print(f"{model} at 1x2: " + ", ".join(
            f"{k} {e['samples_per_second']['mean']:.1f} samples/s, step "
            + "/".join(f"{s['mean'] * 1e3:.0f}" for s in e["step_span_seconds_per_rank"]) + " ms"
            for k, e in results.items()), flush=True)
    return written


def overlap(a, b) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def analyse_timeline(path: str) -> dict:
    """Per rank: allgather spans against the forward that follows them (the first forward
    starting after the allgather started), and the forward's waits for allgathers."""
    with open(path) as fh:
        text = fh.read().rstrip()
    events = json.loads(text if text.endswith("]") else text + "]")
    per_rank = {}
    for ev in events:
        if ev.get("ph") == "X" and ev["ts"] >= 0:
            span = (ev["ts"] / 1e6, (ev["ts"] + ev["dur"]) / 1e6)
            per_rank.setdefault(ev["pid"], {}).setdefault(ev["name"], []).append(span)
    out = {}
    for rank, spans in sorted(per_rank.items()):
        gathers = spans.get("bucket_allgather", [])
        forwards = sorted(spans.get("forward", []))
        waits = spans.get("forward_wait_allgather", [])
        total = sum(e - s for s, e in gathers)
        under_forward = under_compute = 0.0
        for g in gathers:
            nxt = next((f for f in forwards if f[1] > g[0]), None)
            if nxt is None:
                continue
            o = overlap(g, nxt)
            under_forward += o
            blocked = sum(overlap((max(g[0], nxt[0]), min(g[1], nxt[1])), w) for w in waits) if o else 0.0
            under_compute += o - blocked
        fwd = sum(e - s for s, e in forwards)
        out[rank] = {"allgather_seconds": total, "allgathers": len(gathers),
                     "overlapped_next_forward_seconds": under_forward,
                     "overlapped_fraction": under_forward / total if total else None,
                     "overlapped_while_forward_computed_seconds": under_compute,
                     "hidden_fraction": under_compute / total if total else None,
                     "forward_seconds": fwd,
                     "forward_wait_allgather_seconds": sum(e - s for s, e in waits),
                     "reduce_scatter_seconds": sum(e - s for s, e in spans.get("bucket_reduce_scatter", [])),
                     "forward_backward_seconds": sum(e - s for s, e in spans.get("forward_backward", [])),
                     "optimizer_step_seconds": sum(e - s for s, e in spans.get("optimizer_step", []))}
    return out


class Hosts:
    """scripts/hosts.sh up/down for one instance of emulated hosts; always taken down."""

    def __init__(self, rate: str, instance: str):
        os.environ["HPCACCEL_HOSTS_INSTANCE"] = instance
        self.rate = rate

    def __enter__(self):
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "hosts.sh"), "up", "2", "--rate", self.rate],
                       check=True, cwd=ROOT)
        return self

    def __exit__(self, *exc):
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "hosts.sh"), "down"], cwd=ROOT)
        return False


def bench_hosts(args, py) -> list[str]:
    if os.geteuid() != 0:
        print("sharding: across hosts needs root (scripts/hosts.sh); skipped", flush=True)
        return []
    written = []
    model = "mlp19m"
    with Hosts(args.rate, args.hosts_instance):
        jobs = Jobs(args, 2, hosts=True)
        runs = run_train(args, jobs, py, model, args.hosts_steps, args.warmup)
        # compute per step without communication: one rank, same model and batch
        alone = Jobs(args, 1)
        computes = []
        for r in range(args.repeats):
            d = alone.run(f"compute {model} 1 rank", script(py, "none", model, args.batch, args.warmup,
                                                           args.hosts_steps, args.threads))
            computes.append(statistics.median(d["per_rank"][0]["step_seconds"]))
        # timeline of one sharded run across hosts
        # a folder of its own: `python -m hpcaccel.bench report` reads every *.json in --out
        trace = os.path.join(args.out, "traces", f"shard-timeline-{model}-2x1.json")
        os.makedirs(os.path.dirname(trace), exist_ok=True)
        tl_variant = args.timeline_variant
        d = jobs.run(f"timeline {tl_variant}", script(py, tl_variant, model, args.batch, args.warmup,
                                                     args.hosts_steps, args.threads,
                                                     ["--timeline", trace]))
    results = train_results(runs, args.batch)
    size = 2
    grad_bytes = runs["none"][0]["parameters"] * 4
    link = args.link_gbit * 1e9 / 8
    # ring allreduce, or reduce-scatter + allgather: 2 (p-1)/p of the gradient per rank
    wire = 2 * (size - 1) / size * grad_bytes
    compute = statistics.median(computes)
    bound = {"gradient_bytes": grad_bytes, "bytes_per_rank_per_step": wire,
             "link_seconds_per_step": wire / link, "compute_seconds_per_step_1_rank": ta.summary(computes),
             "samples_per_second_compute_plus_link": args.batch * size / (compute + wire / link),
             "samples_per_second_max_compute_link": args.batch * size / max(compute, wire / link)}
    for v in results.values():
        v["fraction_of_compute_plus_link_bound"] = (
            v["samples_per_second"]["mean"] / bound["samples_per_second_compute_plus_link"])
    data = {"model": model, "parameters": runs["none"][0]["parameters"], "layout": "2x1",
            "hosts": 2, "ranks_per_host": 1, "link_gbit": args.link_gbit, "rate": args.rate,
            "optimizer": "AdamW", "batch_per_rank": args.batch, "warmup": args.warmup,
            "steps": args.hosts_steps, "repeats": args.repeats, "threads_per_rank": args.threads,
            "results": results, "ratios": ratios(results), "bound": bound,
            "machine": ta.machine({"torch": runs["none"][0]["torch"]})}
    written.append(ta.record(args.out, f"shard-train-{model}-2x1", 2, data))
    print(f"{model} at 2x1, {args.rate}: " + ", ".join(
        f"{k} {e['samples_per_second']['mean']:.1f}" for k, e in results.items())
        + f"; bound (compute {compute * 1e3:.0f} ms + link {wire / link * 1e3:.0f} ms) "
          f"{bound['samples_per_second_compute_plus_link']:.1f} samples/s", flush=True)
    analysis = analyse_timeline(trace)
    written.append(ta.record(args.out, f"shard-timeline-{model}-2x1", 2, {
        "model": model, "variant": LABEL[tl_variant], "layout": "2x1", "link_gbit": args.link_gbit,
        "batch_per_rank": args.batch, "steps": args.hosts_steps,
        "samples_per_second": d["samples_per_second"], "trace": os.path.relpath(trace, args.out),
        "definition": "overlapped_fraction: allgather time inside the forward that follows it "
                      "(its first forward ending after the allgather started) / allgather time; "
                      "hidden_fraction: the same minus the time that forward spent waiting for an "
                      "allgather (forward_wait_allgather)", "per_rank": analysis}))
    for rank, a in analysis.items():
        print(f"  timeline rank {rank}: allgather {a['allgather_seconds']:.2f} s in {a['allgathers']} spans, "
              f"{a['overlapped_fraction'] or 0:.2f} of it under the next forward, "
              f"{a['hidden_fraction'] or 0:.2f} while the forward computed "
              f"(forward waited {a['forward_wait_allgather_seconds']:.2f} s)", flush=True)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="memory,train,hosts")
    p.add_argument("--models", default="mlp19m,mlp25m,cnn")
    p.add_argument("--memory-np", default="1,2,4")
    p.add_argument("--memory-model", default="mlp25m")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--hosts-steps", type=int, default=10)
    p.add_argument("--rate", default=os.environ.get("BENCH_HOSTS_RATE", "1gbit"))
    p.add_argument("--link-gbit", type=float, default=float(os.environ.get("HPCACCEL_BENCH_LINK_GBIT", "1")))
    p.add_argument("--hosts-instance", default=os.environ.get("HPCACCEL_HOSTS_INSTANCE", "2"))
    p.add_argument("--timeline-variant", choices=("optimizer", "gradients"), default="optimizer")
    p.add_argument("--threads", type=int, default=int(os.environ.get("HPCACCEL_BENCH_THREADS", "1")))
    p.add_argument("--job-timeout", type=int, default=900)
    p.add_argument("--smoke", action="store_true", default=os.environ.get("HPCACCEL_BENCH_SMOKE") == "1")
    p.add_argument("--out", default=os.environ.get("HPCACCEL_BENCH_OUT",
                                                   os.path.join(ROOT, "benchmarks", "results")))
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.memory_np = [int(n) for n in args.memory_np.split(",") if n]
    parts = set(args.parts.split(","))
    if args.smoke:  # keeps it working: tiny, once, one host; numbers meaningless
        args.models, args.repeats, args.batch, args.warmup, args.steps = ["cnn"], 1, 4, 1, 2
        args.job_timeout = 120
        parts -= {"memory", "hosts"}  # every train job measures memory the same way
    # a TERM (timeout, make interrupted) still takes the hosts down (Hosts.__exit__)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    py = ta.python()
    written = []
    if "memory" in parts:
        print(f"== memory: {args.memory_model}, AdamW, at {args.memory_np} ranks", flush=True)
        written += bench_memory(args, py)
    if "train" in parts:
        print(f"== training, 2 ranks on this host: {', '.join(LABEL[v] for v in TRAIN)}; "
              f"{args.repeats} interleaved repeats of {args.steps} steps after {args.warmup}", flush=True)
        written += bench_train(args, py)
    if "hosts" in parts:
        print(f"== 2 emulated hosts x 1 rank at {args.rate}", flush=True)
        written += bench_hosts(args, py)
    for path in written:
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
