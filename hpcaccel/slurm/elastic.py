"""Render-time checks of an elastic job (`render cpu --elastic`). Pure, no I/O.

An elastic job starts on all `nodes` and may go on with any node count down to
`min_nodes`. hpcaccel.train keeps the run's global batch G = nodes x ranks per node x
--batch-size at every world size it continues on (hpcaccel/elastic.py: G / ranks samples
per rank), which needs G to be a multiple of every rank count the job may end up with.
Where it is not, the relaunch after a lost node would end the job with exit 2 exactly
when it was meant to go on; so the renderer refuses such a job up front, naming the node
counts that do keep G and a --min-nodes or --batch-size that makes the job work.
"""
from __future__ import annotations

import math

from ..errors import UsageError
from ..wording import plural


def check(nodes: int, min_nodes: int, ranks_per_node: int, batch_size: int,
          accum_steps: int = 1, elastic_flag: str = "--elastic",
          min_nodes_flag: str | None = None) -> None:
    """UsageError, one line naming the flag (`min_nodes_flag` where the user set min_nodes,
    else `elastic_flag`), unless the job has a node to lose and every node count from
    `min_nodes` to `nodes` keeps the global batch `nodes` x `ranks_per_node` x `batch_size`."""
    if nodes < 2:
        raise UsageError(f"{elastic_flag}: needs --nodes 2 or more: with {plural(nodes, 'node')} "
                         f"there is none to lose and go on without (drop --elastic, or ask for "
                         f"more --nodes)")
    flag = min_nodes_flag or elastic_flag
    counts = range(min_nodes, nodes + 1)
    global_batch = nodes * ranks_per_node * batch_size
    bad = [k for k in reversed(counts) if global_batch % (k * ranks_per_node)]
    if not bad:
        return
    good = [k for k in reversed(counts) if k not in bad]
    fixes = []
    lowest = bad[0] + 1  # the smallest --min-nodes whose node counts all keep it
    if lowest < nodes:
        fixes.append(f"--min-nodes {lowest}")
    sizes = _batch_sizes(nodes, counts, batch_size, accum_steps)
    fixes.append(f"--batch-size {_either(sizes)} (global batch "
                 f"{_either([nodes * ranks_per_node * b for b in sizes])})")
    raise UsageError(
        f"{flag}: the global batch {global_batch} ({plural(nodes, 'node')} x "
        f"{plural(ranks_per_node, 'rank')} x --batch-size {batch_size}) cannot be split evenly "
        f"over {_ranks(bad, ranks_per_node)}, which the job goes on with after losing nodes "
        f"(down to --min-nodes {min_nodes}); it splits evenly over "
        f"{_ranks(good, ranks_per_node)}: use {' or '.join(fixes)}")


def _ranks(counts: list, ranks_per_node: int) -> str:
    """[4, 2], 2 -> '8 or 4 ranks (4 or 2 nodes)'."""
    ranks = _either([k * ranks_per_node for k in counts])
    nodes = _either(counts)
    return (f"{ranks} {'rank' if ranks == '1' else 'ranks'} "
            f"({nodes} {'node' if nodes == '1' else 'nodes'})")


def _either(items: list) -> str:
    """[8, 6, 4] -> '8, 6 or 4'."""
    words = [str(i) for i in items]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _batch_sizes(nodes: int, counts: range, batch_size: int, accum_steps: int) -> list:
    """The --batch-size values next to `batch_size` (below and above) whose global batch
    every node count in `counts` keeps: nodes x b must be a multiple of each count k
    (ranks per node cancel out), so b a multiple of lcm(counts) / gcd(nodes, lcm)."""
    step = 1
    for k in counts:
        step = step * k // math.gcd(step, k)
    step //= math.gcd(nodes, step)
    below = batch_size // step * step
    sizes = [below] if below >= max(1, accum_steps) else []
    return sizes + [below + step]
