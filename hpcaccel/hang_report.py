"""The hang report: when the stall watchdog fires, which rank holds the job up.

Each rank whose watchdog fires writes OUT/hang-report/rank-N.txt (its phase, last step and
the collective it is in, from collectives.TRACKER) and waits `grace` seconds for the others.
The lowest rank that reported then reads every rank's file and writes the summary to
stderr and OUT/hang-report.txt, naming the rank(s) that did not report, are outside any
collective, or are in a different collective than the rest; then the job is aborted.
Through the file system, not MPI: the communicator is what hangs. A --out that is not
shared across hosts gives a summary of the reporting host's ranks only.
"""
from __future__ import annotations

import json
import os
import sys
import time

from .collectives import CHANNELS, TRACKER


def describe(open_: dict | None) -> str:
    if open_ is None:
        return "in no collective"
    return (f"in {open_['kind']} #{open_['seq']} (step {open_['step']}, {open_['bytes']} bytes, "
            f"waiting {open_['waiting_s']:g} s)")


def rank_state(rank: int, phase: str, step: int) -> dict:
    """Local. What this rank reports."""
    snap = TRACKER.snapshot()
    return {"rank": rank, "phase": phase, "step": step, "seq": snap["seq"], "open": snap["open"]}


# what each channel's collectives are, in a verdict: (one, several)
LABELS = {"control": ("control-plane collective", "control-plane collectives"),
          "gradients": ("gradient bucket allreduce", "gradient bucket allreduces"),
          "collectives": ("hpcaccel.torch collective",
                          "hpcaccel.torch collectives")}


def summarize(states: dict[int, dict], size: int) -> tuple[list[int], list[str]]:
    """Pure. (blamed ranks, lines) from the reports of ranks `states` of `size`."""
    lines, blamed = [], []
    missing = [r for r in range(size) if r not in states]
    if missing:
        blamed += missing
        lines.append(f"rank(s) {missing[:16]} did not report (dead, or hung without Python "
                     f"running): look at them first")
    outside = [r for r, s in sorted(states.items()) if all(o is None for o in s["open"].values())]
    inside = [r for r in sorted(states) if r not in outside]
    if outside and inside:
        blamed += outside
        lines.append(f"rank(s) {outside[:16]} outside any collective (the others wait in one): "
                     f"they are behind, in {states[outside[0]]['phase']} after step "
                     f"{states[outside[0]]['step']}")
    splits = _splits(states, inside)
    if splits:
        odd, verdict = _odd_ones(states, splits)
        blamed += [r for r in odd if r not in blamed]
        lines += verdict
    if not blamed:
        lines.append("every rank reported and waits in the same collective: a peer outside the "
                     "job, or the network, holds them up")
    return sorted(set(blamed)), lines


def _splits(states, inside) -> list[tuple[str, int, list[int], list[int]]]:
    """(channel, top, ahead, short) where ranks inside collectives disagree: `ahead` wait in
    collective #top of the channel, which `short` (count below top, waiting in another
    channel) never issued. Every rank issues the same collectives in the same order, so
    either the ahead ones issued one too many or the short ones skipped one."""
    found = []
    for channel in CHANNELS:
        seq = {r: states[r]["seq"].get(channel, 0) for r in inside}
        top = max(seq.values(), default=0)
        ahead = [r for r in inside if (states[r]["open"].get(channel) or {}).get("seq") == top]
        short = [r for r in inside if seq[r] < top and states[r]["open"].get(channel) is None]
        if ahead and short:
            found.append((channel, top, ahead, short))
    return found


def _odd_ones(states, splits) -> tuple[list[int], list[str]]:
    """The ranks that did something the others did not, and the lines saying what.

    Who, in order: the minority of a split (at three ranks or more, the side fewer ranks
    are on); else the ranks at a later step than the others (the others could not have
    completed that step: these skipped a collective); else ranks that issued more
    collectives of the channel they wait in this step than in their previous step (a
    training loop issues the same ones every step: an extra collective); else both sides,
    said as such. The conclusion says skipped where they went on to a later step, extra
    where they broke their own rhythm, and either where only their number tells."""
    involved = sorted({r for _, _, a, s in splits for r in a + s})
    minority = set()
    for _, _, ahead, short in splits:
        if len(ahead) != len(short):
            minority.update(ahead if len(ahead) < len(short) else short)
    steps = {r: states[r]["step"] for r in involved}
    later = [r for r in involved if steps[r] > min(steps.values())]
    extra = {r for channel, _, ahead, _ in splits for r in ahead
             if states[r].get("last_step") is not None
             and states[r]["this_step"][channel] > states[r]["last_step"][channel]}
    if minority:
        odd = sorted(minority)
    elif later:
        odd = later
    elif extra and len(extra) < len(involved):
        odd = sorted(extra)
    else:
        odd = involved
    lines = []
    for channel, top, ahead, short in splits:
        one, several = LABELS.get(channel, (channel, channel))
        who = [r for r in short if r in odd]
        if who:
            counts = sorted({states[r]["seq"].get(channel, 0) for r in who})
            lines.append(f"rank(s) {who[:16]} issued fewer {several} "
                         f"({', '.join(map(str, counts))} against {top}) and wait in another "
                         f"collective")
        who = [r for r in ahead if r in odd]
        if who:
            lines.append(f"rank(s) {who[:16]} wait in {one} #{top} "
                         f"({states[who[0]]['open'][channel]['kind']}), which rank(s) "
                         f"{short[:16]} never issued")
    if later and set(odd) <= set(later):
        lines.append(f"rank(s) {odd[:16]} went on to step {max(steps.values())} while the "
                     f"others completed step {min(steps.values())} only: they skipped a "
                     f"collective")
    elif set(odd) <= extra:
        lines.append(f"rank(s) {odd[:16]} issued more collectives in this step than in their "
                     f"previous one: they issued an extra collective")
    elif odd == involved and not minority:
        lines.append(f"rank(s) {odd[:16]} each wait in a collective the others never issued: "
                     f"one side skipped a collective or issued an extra one")
    else:
        lines.append(f"rank(s) {odd[:16]} did not issue what the others did: they skipped a "
                     f"collective or issued an extra one")
    return odd, lines


class HangReport:
    """The watchdog's `report` callable for one rank: report(phase, step) before abort."""

    def __init__(self, out: str, rank: int, size: int, grace: float = 5.0):
        self.out, self.rank, self.size, self.grace = out, rank, size, grace
        self.dir = os.path.join(out, "hang-report")
        self._mine = os.path.join(self.dir, f"rank-{rank}.txt")
        try:  # a file from an earlier job must not count as this job's report
            os.remove(self._mine)
        except OSError:
            pass

    def __call__(self, phase: str, step: int) -> str:
        """Write this rank's report, wait for the others; the lowest reporting rank writes
        the summary. Returns this rank's one-line state."""
        state = rank_state(self.rank, phase, step)
        opened = [f"{c}: {describe(o)}" for c, o in state["open"].items() if o is not None]
        line = "; ".join(opened) if opened else "in no collective"
        try:
            os.makedirs(self.dir, exist_ok=True)
            tmp = self._mine + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(json.dumps(state) + "\n")
            os.replace(tmp, self._mine)
        except OSError as e:
            sys.stderr.write(f"hpcaccel: rank {self.rank}: cannot write the hang report: {e}\n")
            return line
        time.sleep(self.grace)
        states = self._read()
        if states and min(states) == self.rank:
            self._summary(states)
        else:
            time.sleep(min(self.grace, 3.0))  # let the summarizing rank finish before aborting
        return line

    def _read(self) -> dict[int, dict]:
        states = {}
        for r in range(self.size):
            try:
                with open(os.path.join(self.dir, f"rank-{r}.txt")) as fh:
                    states[r] = json.loads(fh.read())
            except (OSError, ValueError):
                pass
        return states

    def _summary(self, states: dict[int, dict]) -> None:
        blamed, verdicts = summarize(states, self.size)
        lines = [f"hpcaccel: hang report ({len(states)} of {self.size} ranks reported): "
                 f"{'rank(s) ' + ','.join(map(str, blamed[:16])) if blamed else 'no rank'} "
                 f"to blame"]
        lines += [f"  {v}" for v in verdicts]
        for r in range(self.size):
            s = states.get(r)
            if s is None:
                lines.append(f"  rank {r}: no report")
                continue
            where = "; ".join(f"{c} {describe(o)}" for c, o in s["open"].items() if o is not None)
            lines.append(f"  rank {r}: {s['phase']} after step {s['step']}, "
                         f"{where or 'in no collective'} (sequence {s['seq']})")
        text = "\n".join(lines) + "\n"
        sys.stderr.write(text)
        sys.stderr.flush()
        try:
            with open(os.path.join(self.out, "hang-report.txt"), "w") as fh:
                fh.write(text)
        except OSError:
            pass
