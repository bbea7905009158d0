"""Benchmark tools.

  python -m hpcaccel.bench predict --grad-mb 100 --compute-ms 120 [--network ib100]
        [--results benchmarks/results] [--overlap 0.5]
      Ring-allreduce cost model: step time and weak-scaling efficiency at 2..1024 ranks,
      fitted to this machine's microbenchmark (if results exist) and for network presets.
  python -m hpcaccel.bench report [--results benchmarks/results] [--plots docs/img]
      Tables (markdown, to stdout) and PNG plots from the benchmark results.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..cli import Parser, usage_error
from ..errors import UsageError
from . import costmodel, report


def predict(args) -> str:
    grad = args.grad_mb * 2**20
    compute = args.compute_ms / 1e3
    models = []
    results = args.results or "benchmarks/results"
    fitted = report.fitted_model(report.load(results).get("allreduce", {}))
    if fitted is None and args.results:  # asked for, not there: say so, never ignore it
        raise UsageError(f"--results {args.results}: no allreduce microbenchmark results there "
                         f"(run `make bench` first, or leave --results out for the network "
                         f"presets only)")
    gamma = fitted["gamma"] if fitted else 1 / 10e9
    if fitted:
        models.append(("this machine (fitted: alpha %.2f us, beta %.3f ns/B, gamma %.3f ns/B)"
                       % (fitted["alpha"] * 1e6, fitted["beta"] * 1e9, fitted["gamma"] * 1e9),
                       fitted["alpha"], fitted["beta"]))
    for key in ([args.network] if args.network else list(costmodel.PRESETS)):
        net = costmodel.PRESETS[key]
        models.append((net.name, net.alpha, net.beta))
    lines = [f"gradient {args.grad_mb:g} MiB, compute {args.compute_ms:g} ms per step, "
             f"overlap {args.overlap:g}, gamma {gamma * 1e9:.3f} ns/B"]
    if fitted is None:
        lines.append(f"no microbenchmark results in {results} (`make bench` makes them): "
                     f"network presets only, gamma assumed")
    for name, alpha, beta in models:
        lines += ["", f"## {name}", "| ranks | allreduce (ms) | step (ms) | efficiency |", "| --- | --- | --- | --- |"]
        for row in costmodel.predict_table(compute, grad, alpha, beta, gamma, overlap=args.overlap):
            lines.append(f"| {row['ranks']} | {row['allreduce_s'] * 1e3:.2f} | {row['step_s'] * 1e3:.1f} "
                         f"| {row['efficiency']:.0%} |")
    if args.nodes:
        lines += ["", levels_table(args, fitted, gamma, grad, compute)]
    if args.json:
        return json.dumps({"fitted": fitted, "models": [
            {"name": n, "rows": costmodel.predict_table(compute, grad, a, b, gamma, overlap=args.overlap)}
            for n, a, b in models]}, indent=1)
    return "\n".join(lines)


def inter_level(args, results: str):
    """The across-host (alpha, beta): --network's preset where given (the same network as
    the tables above), else --inter-gbit and --inter-alpha-us, else fitted to hpcaccel's ring
    at 2 hosts x 1 rank where benchmarks/hosts results exist, else 1 Gbit/s."""
    import glob
    import os

    if args.network:
        return costmodel.PRESETS[args.network]
    if args.inter_gbit is None:
        for path in sorted(glob.glob(os.path.join(results, "hosts-allreduce-2x1-all-np2.json"))):
            with open(path) as fh:
                rows = json.load(fh)["results"].get("hpcaccel mpi ring", {})
            samples = [(2, int(n), r["seconds"]) for n, r in rows.items() if int(n) >= 1 << 20]
            if len(samples) >= 2:
                alpha, beta = costmodel.fit(samples, 0.0)
                return costmodel.Network(f"fitted to {os.path.basename(path)}", alpha, beta)
    gbit = args.inter_gbit or 1.0
    return costmodel.Network(f"{gbit:g} Gbit/s", args.inter_alpha_us * 1e-6, 8 / (gbit * 1e9))


def levels_table(args, fitted, gamma, grad, compute) -> str:
    """Allreduce 1-64 MiB and the step at --nodes x --ranks-per-node, per algorithm."""
    results = args.results or "benchmarks/results"
    intra = costmodel.Network("within a host", *(
        (fitted["alpha"], fitted["beta"]) if fitted else (2e-6, 1 / 8e9)))
    inter = inter_level(args, results)
    H, L = args.nodes, args.ranks_per_node
    algos = [args.algorithm] if args.algorithm else list(costmodel.ALGORITHM_TIMES)
    lines = [f"## {H} nodes x {L} ranks: within a host alpha {intra.alpha * 1e6:.2f} us, "
             f"beta {intra.beta * 1e9:.3f} ns/B; across hosts ({inter.name}) alpha "
             f"{inter.alpha * 1e6:.0f} us, beta {inter.beta * 1e9:.2f} ns/B",
             "| size | " + " | ".join(f"{a} (ms)" for a in algos) + " |", "|---" * (len(algos) + 1) + "|"]
    for mb in (1, 4, 16, 64, args.grad_mb):
        times = [costmodel.allreduce_time(a, H, L, mb * 2**20, intra, inter, gamma) for a in algos]
        lines.append(f"| {mb:g} MiB | " + " | ".join(f"{t * 1e3:.1f}" for t in times) + " |")
    for a in algos:
        comm = costmodel.allreduce_time(a, H, L, grad, intra, inter, gamma)
        step = compute + comm - min(comm, args.overlap * compute)
        lines.append(f"\n{a}: step {step * 1e3:.0f} ms (compute {compute * 1e3:.0f} + allreduce "
                     f"{comm * 1e3:.0f} - hidden {min(comm, args.overlap * compute) * 1e3:.0f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        return run(argv)
    except UsageError as e:
        return usage_error("hpcaccel.bench", e)


def run(argv=None) -> int:
    p = Parser(prog="python -m hpcaccel.bench", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="cost-model predictions of step time and efficiency")
    pr.add_argument("--grad-mb", type=float, required=True, help="gradient size per step (MiB)")
    pr.add_argument("--compute-ms", type=float, required=True, help="compute time per step on one rank (ms)")
    pr.add_argument("--network", choices=sorted(costmodel.PRESETS), help="one preset (default: "
                    "all); with --nodes, also the link across hosts")
    pr.add_argument("--overlap", type=float, default=0.0, help="fraction of compute that can hide communication (0..1)")
    pr.add_argument("--results", default=None, help="microbenchmark results to fit (default: "
                    "benchmarks/results where present; a folder given here must hold them)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.add_argument("--nodes", type=int, default=None, help="also predict per level for this "
                    "many hosts (with --ranks-per-node): within-host and across-host fits")
    pr.add_argument("--ranks-per-node", type=int, default=1, help="ranks on each host (--nodes)")
    pr.add_argument("--algorithm", choices=sorted(costmodel.ALGORITHM_TIMES), default=None,
                    help="--nodes: ring (flat) or hierarchical (default: both)")
    pr.add_argument("--inter-gbit", type=float, default=None, help="--nodes: link rate across "
                    "hosts (default: --network's, else fitted to benchmarks/hosts results, else 1)")
    pr.add_argument("--inter-alpha-us", type=float, default=50.0, help="--nodes: latency per "
                    "message across hosts with --inter-gbit (us)")
    rp = sub.add_parser("report", help="markdown tables and PNG plots from results")
    rp.add_argument("--results", default="benchmarks/results")
    rp.add_argument("--plots", default="docs/img", help="directory for PNG plots")
    args = p.parse_args(argv)
    if args.command == "predict":
        if args.grad_mb <= 0 or args.compute_ms <= 0 or not 0 <= args.overlap <= 1:
            raise UsageError("--grad-mb and --compute-ms must be positive, --overlap in [0, 1]")
        if args.nodes is not None and (args.nodes < 1 or args.ranks_per_node < 1):
            raise UsageError("--nodes and --ranks-per-node must be at least 1")
        if args.network and args.inter_gbit is not None:
            raise UsageError(f"--inter-gbit: --network {args.network} already sets the link "
                             f"across hosts; give one of them")
        print(predict(args))
        return 0
    results = report.load(args.results)
    if not results:
        raise UsageError(f"--results {args.results}: no results (run `make bench`)")
    for path in report.plots(results, args.plots) + report.hosts_plots(results, args.plots):
        print(f"plot: {path}")
    for p_, _ in sorted(results.get("allreduce", {}).items()):
        print(f"\n### allreduce at {p_} ranks\n\n" + report.allreduce_table(results["allreduce"], p_))
    for key in sorted(k for k in results if k.startswith("throughput-")):
        for scaling in ("weak", "strong"):
            print(f"\n### {key[11:]}: {scaling} scaling\n\n" + report.throughput_table(results[key], scaling))
    tables = report.torch_api_tables(results)
    if tables:
        print("\n### your own script: hpcaccel.torch, Horovod, torch DDP (benchmarks/torch_api)\n\n" + tables)
    fitted = report.fitted_model(results.get("allreduce", {}))
    if fitted:
        print(f"\nfitted ring model: alpha {fitted['alpha'] * 1e6:.2f} us, beta {fitted['beta'] * 1e9:.3f} ns/B, "
              f"gamma {fitted['gamma'] * 1e9:.3f} ns/B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
