"""Ranks that wait in different collectives: found from what the waiting ranks tell each
other, never by a timeout.

A rank that waits in collective `seq` of a channel (it entered it: its count on that channel
is `seq`) goes on only once every rank has entered it. Rank a waits for rank b when b's
count on a's channel is below a's collective: b has not entered it yet. A rank that waits
for a rank that can never go on can never go on either; so the ranks that wait, each for at
least one rank of their own set, are stuck for good: they run different collectives (one
skipped one, or they went different ways), and every one of them fails naming the
collectives, instead of waiting until a watchdog fires. A rank that computes (it tells no
wait) is never part of such a set, however long it takes: a slow rank is never an error.

Pure: departure.py carries the notices (what each rank waits in and its counts) and decides
when they are settled enough to judge (each unchanged for a while, and recent).

Why a settled set is real (every collective here completes only once every rank entered
it: allreduces, barriers, gathers after an arrival barrier, bucket reductions): take a rank
r of the set and a rank q it waits for. q has not entered r's collective, so r's collective
has not completed and r still waits in it, as it told; and q, also in the set, waits for
another rank of the set, and so on round a cycle that contains the judging rank itself,
whose own state is current. So no member can have moved on.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wait:
    """What a rank waits in: collective `seq` (counted from the notices' start) of
    `channel`, described as `what`; `counts`: the rank's count on every channel."""

    channel: str
    seq: int
    what: str
    counts: dict


def waits_for(rank: int, wait: Wait, counts: dict[int, dict]) -> list[int]:
    """The ranks (of `counts`: rank -> its counts) that have not entered `rank`'s
    collective."""
    return sorted(q for q, c in counts.items() if q != rank and c.get(wait.channel, 0) < wait.seq)


def stuck(waits: dict[int, Wait]) -> set[int]:
    """The ranks of `waits` (rank -> what it waits in, every rank that waits) that can never
    go on: the largest set whose members each wait for a member. A rank absent from
    `waits` computes: it can go on, and a rank waiting only for such ranks can too."""
    counts = {r: w.counts for r, w in waits.items()}
    need = {r: set(waits_for(r, w, counts)) for r, w in waits.items()}
    members = set(waits)
    while True:
        keep = {r for r in members if need[r] & members}
        if keep == members:
            return members
        members = keep


def cycle_from(rank: int, waits: dict[int, Wait], members: set[int]) -> list[int]:
    """Ranks of `members` in wait order from `rank` (each waits for the next) until one
    repeats: the part of the stuck set that holds `rank` up."""
    counts = {r: w.counts for r, w in waits.items()}
    path, seen = [rank], {rank}
    while True:
        here = path[-1]
        nxt = [q for q in waits_for(here, waits[here], counts) if q in members]
        q = nxt[0]
        if q in seen:
            return path[path.index(q):] if q != rank else path
        path.append(q)
        seen.add(q)


def describe(rank: int, waits: dict[int, Wait], members: set[int]) -> str:
    """One line: which ranks wait in which collectives that the others never entered."""
    ranks = cycle_from(rank, waits, members)
    parts = []
    for r in ranks:
        w = waits[r]
        others = [q for q in waits_for(r, w, {q: waits[q].counts for q in ranks}) if q in ranks]
        parts.append(f"rank {r} waits in {w.channel} collective #{w.seq}"
                     f"{' (' + w.what + ')' if w.what else ''}, which rank"
                     f"{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} never "
                     f"entered")
    held = "" if rank in ranks else f"rank {rank} waits for them; "
    return (f"the ranks run different collectives: {held}{'; '.join(parts)} (a rank skipped "
            f"a collective or ran an extra one)")
