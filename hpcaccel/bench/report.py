"""Benchmark results (benchmarks/results/*.json) -> plots and the docs/benchmarks.md tables."""
from __future__ import annotations

import glob
import json
import os

from . import costmodel


def load(results_dir: str) -> dict:
    """{benchmark: {ranks: data}} from every results JSON."""
    out: dict = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as fh:
            data = json.load(fh)
        out.setdefault(data["benchmark"], {})[data["ranks"]] = data
    return out


def fitted_model(allreduce: dict, impl: str = "mpi4py Allreduce in-place") -> dict | None:
    """alpha, beta of the ring model fitted to the measured allreduce (p > 1), gamma from the
    measured memory bandwidth (an addition reads two operands and writes one: 3 bytes moved
    per byte reduced)."""
    samples, gamma = [], None
    for p, data in allreduce.items():
        gamma = 3 / data["memcpy_bytes_per_second"]  # memcpy figure counts read + write bytes
        rows = data["results"].get(impl, {}).get("rows", [])
        samples += [(p, r["bytes"], r["seconds"]) for r in rows]
    if gamma is None or len([s for s in samples if s[0] > 1]) < 2:
        return None
    alpha, beta = costmodel.fit(samples, gamma)
    return {"alpha": alpha, "beta": beta, "gamma": gamma, "fitted_on": impl}


def _fmt_bytes(n: int) -> str:
    for unit, k in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n >> k} {unit}"
    return f"{n} B"


def allreduce_table(allreduce: dict, ranks: int) -> str:
    data = allreduce[ranks]
    impls = [n for n, r in data["results"].items() if "rows" in r]
    lines = [f"| size | " + " | ".join(impls) + " |", "| --- |" + " --- |" * len(impls)]
    by_size = {}
    for n in impls:
        for row in data["results"][n]["rows"]:
            by_size.setdefault(row["bytes"], {})[n] = row
    for size in sorted(by_size):
        cells = []
        for n in impls:
            row = by_size[size].get(n)
            cells.append(f"{row['seconds'] * 1e6:,.1f} us, {row['busbw'] / 1e9:.2f} GB/s" if row else "")
        lines.append(f"| {_fmt_bytes(size)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput_table(throughput: dict, scaling: str) -> str:
    ranks = sorted(throughput)
    base = throughput.get(1, {}).get("results", {}).get(scaling, {})
    names = sorted({n for p in ranks for n in throughput[p]["results"].get(scaling, {})})
    lines = ["| ranks | backend | samples/s (mean, 95% CI) | per rank | efficiency | compute / comm wait / data wait (ms per step) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for p in ranks:
        for n in names:
            e = throughput[p]["results"].get(scaling, {}).get(n)
            if not e:
                continue
            s = e["samples_per_second"]
            ci = f" ({s['ci95'][0]:.0f}-{s['ci95'][1]:.0f})" if s.get("ci95") else ""
            b1 = base.get(n) or base.get("hpcaccel mpi")
            eff = ""
            if b1:
                one = b1["samples_per_second"]["mean"]
                # throughput over p x one rank's: weak scaling (fixed work per rank) and
                # strong scaling (speed-up / p, fixed global work) come to the same ratio
                eff = f"{s['mean'] / (one * p):.0%}"
            br = e.get("breakdown_seconds_per_step")
            brs = f"{br['compute'] * 1e3:.1f} / {br['comm_wait'] * 1e3:.1f} / {br['data_wait'] * 1e3:.2f}" if br else "-"
            lines.append(f"| {p} | {n} | {s['mean']:.0f}{ci} | {s['mean'] / p:.0f} | {eff} | {brs} |")
    return "\n".join(lines)


def _save(fig, ax, path: str, written: list[str]) -> None:
    """Legend, layout, write `path` (PNG), close, and append it to `written`."""
    import matplotlib.pyplot as plt

    if ax is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def plots(results: dict, out_dir: str) -> list[str]:
    """PNG plots: busbw vs size per backend; efficiency vs ranks; step breakdown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for p, data in sorted(results.get("allreduce", {}).items()):
        if p < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, r in data["results"].items():
            if "rows" in r:
                ax.plot([x["bytes"] for x in r["rows"]], [x["busbw"] / 1e9 for x in r["rows"]],
                        marker="o", ms=3, label=name)
        ax.axhline(data["memcpy_bytes_per_second"] / 1e9, ls="--", c="grey", label="memcpy (read+write)")
        ax.set(xscale="log", xlabel="message size (bytes)", ylabel="busbw (GB/s)",
               title=f"allreduce busbw at {p} ranks")
        _save(fig, ax, os.path.join(out_dir, f"allreduce-busbw-np{p}.png"), written)
    for key, per in results.items():
        if not key.startswith("throughput-") or 1 not in per:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, scaling in zip(axes, ("weak", "strong")):
            names = sorted({n for d in per.values() for n in d["results"].get(scaling, {})})
            for n in names:
                xs, ys = [], []
                for p in sorted(per):
                    e = per[p]["results"].get(scaling, {}).get(n)
                    b1 = per[1]["results"].get(scaling, {}).get(n)
                    if e and b1:
                        xs.append(p)
                        ys.append(e["samples_per_second"]["mean"] / (b1["samples_per_second"]["mean"] * p))
                ax.plot(xs, ys, marker="o", label=n)
            ax.set(xlabel="ranks", ylabel="efficiency", title=f"{key[11:]}: {scaling} scaling", ylim=(0, 1.1))
            ax.legend(fontsize=8)
        _save(fig, None, os.path.join(out_dir, f"{key}-efficiency.png"), written)
        fig, ax = plt.subplots(figsize=(6, 4))
        labels, comp, comm_, wait = [], [], [], []
        for p in sorted(per):
            e = per[p]["results"].get("weak", {}).get("hpcaccel mpi", {}).get("breakdown_seconds_per_step")
            if e:
                labels.append(f"{p} ranks")
                comp.append(e["compute"] * 1e3)
                comm_.append(e["comm_wait"] * 1e3)
                wait.append(e["data_wait"] * 1e3)
        ax.bar(labels, comp, label="compute")
        ax.bar(labels, comm_, bottom=comp, label="exposed communication")
        ax.bar(labels, wait, bottom=[a + b for a, b in zip(comp, comm_)], label="data wait")
        ax.set(ylabel="ms per step", title=f"{key[11:]}: hpcaccel mpi step breakdown (weak)")
        _save(fig, ax, os.path.join(out_dir, f"{key}-breakdown.png"), written)
    return written


def hosts_allreduce(results: dict) -> dict:
    """{"HxL": {implementation: {bytes: row}}, ...} merged from the across-hosts allreduce
    results (benchmarks/hosts/test_allreduce_hosts.py writes one file per job: everything
    but Horovod, then Horovod flat and hierarchical), with each layout's link rate."""
    merged: dict = {}
    for key, per in results.items():
        if not key.startswith("hosts-allreduce-"):
            continue
        for data in per.values():
            layout = f"{data['hosts']}x{data['ranks_per_host']}"
            entry = merged.setdefault(layout, {"link_gbit": None, "results": {}})
            entry["link_gbit"] = entry["link_gbit"] or data.get("link_gbit")
            for name, rows in data["results"].items():
                entry["results"][name] = {int(n): r for n, r in rows.items()}
    return merged


def hosts_plots(results: dict, out_dir: str) -> list[str]:
    """PNG per layout: busbw as a fraction of the link rate against the allreduce size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for layout, entry in sorted(hosts_allreduce(results).items()):
        link = entry["link_gbit"]
        if not link:
            continue
        os.makedirs(out_dir, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rows in sorted(entry["results"].items()):
            sizes = sorted(rows)
            ax.plot(sizes, [rows[n]["busbw_gbit"] / link for n in sizes], marker="o", ms=3,
                    label=name)
        hosts, per_host = (int(v) for v in layout.split("x"))
        if per_host > 1:  # each host sends the gradient once: 1.5 x at 2 x 2
            p = hosts * per_host
            bound = (2 * (p - 1) / p) / (2 * (hosts - 1) / hosts)
            ax.axhline(bound, ls=":", c="grey", label=f"node-aware bound ({bound:.2f} x link)")
        ax.axhline(1.0, ls="--", c="grey", label=f"link rate ({link:g} Gbit/s)")
        ax.set(xscale="log", xlabel="allreduce size (bytes)", ylabel="busbw / link rate",
               title=f"allreduce across {hosts} hosts x {per_host} rank(s), {link:g} Gbit/s links")
        _save(fig, ax, os.path.join(out_dir, f"hosts-allreduce-{layout}.png"), written)
    return written



def _spread(s: dict, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    """mean (min-max) of a benchmarks/torch_api summary, times `scale`."""
    text = fmt.format(s["mean"] * scale)
    if len(s.get("values", [])) > 1:
        text += f" ({fmt.format(s['min'] * scale)}-{fmt.format(s['max'] * scale)})"
    return text


def torch_api_tables(results: dict) -> str:
    """Markdown tables of benchmarks/torch_api/run.py: samples/s of the one Horovod script
    under hpcaccel.torch, real Horovod and torch DDP, with the paired ratios; and the cost
    of one hvd.allreduce call, with and without hpcaccel.torch's agreement check."""
    out = []
    train = {k: per for k, per in results.items() if k.startswith("torch-api-train-")}
    if train:
        variants = ("hpcaccel.torch", "Horovod", "torch DDP gloo")
        out += ["| layout | model | " + " | ".join(variants) + " | hpcaccel.torch / Horovod | "
                "hpcaccel.torch / DDP | same parameters |",
                "| --- | --- |" + " --- |" * (len(variants) + 3)]
        for key in sorted(train, key=lambda k: (k.rsplit("-", 1)[1], k)):
            for data in train[key].values():
                r, q = data["results"], data["ratios"]
                cells = [_spread(r[v]["samples_per_second"]) if v in r else "-" for v in variants]
                ratios = [_spread(q[k], fmt="{:.2f}") if q.get(k) else "-"
                          for k in ("hpcaccel.torch / Horovod", "hpcaccel.torch / torch DDP gloo")]
                out.append(f"| {data['layout']} | {data['model']} | " + " | ".join(cells + ratios) +
                           f" | {'yes' if data['same_final_parameters'] else 'no'} |")
    calls = {k: per for k, per in results.items() if k.startswith("torch-api-allreduce-")}
    if calls:
        impls = ("mpi4py Allreduce", "hpcaccel.torch", "hpcaccel.torch, check skipped", "Horovod")
        out += ["", "| layout | size | " + " | ".join(impls) + " | the check (us per call) |",
                "| --- | --- |" + " --- |" * (len(impls) + 1)]
        for key in sorted(calls):
            for data in calls[key].values():
                r, check = data["results"], data.get("check_seconds_per_call", {})
                for n in sorted({int(n) for v in r.values() for n in v}):
                    cells = [_spread(r[i][str(n)], 1e6) + " us" if str(n) in r.get(i, {}) else "-"
                             for i in impls]
                    c = _spread(check[str(n)], 1e6) if str(n) in check else "-"
                    out.append(f"| {data['layout']} | {_fmt_bytes(n)} | " + " | ".join(cells) + f" | {c} |")
    return "\n".join(out)
