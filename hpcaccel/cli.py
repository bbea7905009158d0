"""The one argument parser of every hpcaccel command (train, data, slurm, bench).

Usage errors become a UsageError, so each command reports them as its other bad input:
one line `PROG: error: MESSAGE` on stderr and exit code 2 (`usage_error`). Flags must be
spelled out in full: argparse would otherwise accept `--ou` for `--out`, and a batch
template that appends its own flags could be overridden by an abbreviation it never sees.
"""
from __future__ import annotations

import argparse
import sys

from .errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations, raising UsageError instead of exiting.

    quiet: print nothing (no --help, no usage), for MPI ranks other than 0, so help is
    printed once per job.
    """

    def __init__(self, *args, quiet: bool = False, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self.quiet = quiet

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", Parser)
        return super().add_subparsers(**kwargs)

    def _print_message(self, message, file=None):
        if not self.quiet:
            super()._print_message(message, file)

    def error(self, message):
        raise UsageError(message)


def boolean(text: str) -> bool:
    """A flag's true/false value (also 1/0, yes/no, on/off)."""
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def usage_error(prog: str, error: UsageError) -> int:
    """Report bad input the one way: a single line naming the flag or file; exit code 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return UsageError.exit_code
