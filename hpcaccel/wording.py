"""How counts and sizes read in messages, alike in every command: "1 rank", "2 ranks";
sizes in MiB (2**20 bytes, the unit of every --*-mb flag), rounded to what matters."""
from __future__ import annotations


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """2, "rank" -> "2 ranks"; 1, "rank" -> "1 rank"."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def mib(nbytes: float) -> str:
    """A size in MiB: whole from 10 MiB up, else 3 significant digits ("25 MiB", "1.5 MiB",
    "0.01 MiB" for the 10485 bytes of --bucket-mb 0.01)."""
    value = nbytes / 2**20
    return f"{value:.0f} MiB" if value >= 10 else f"{value:.3g} MiB"
