"""Errors that end a run with a specific exit code.

UsageError is bad input (a flag, a file, a checkpoint): the run ends with exit code 2 and
one line naming the flag or file, printed by rank 0 only.
"""


class UsageError(Exception):
    """Bad input or usage. The message names the offending file or flag."""

    exit_code = 2


class SetupFailed(Exception):
    """A non-usage failure during set-up, already agreed on by all ranks (exit code 1)."""

    exit_code = 1


class Diverged(Exception):
    """The loss became NaN/inf on some rank; raised on every rank together (exit code 1)."""

    exit_code = 1


# The run was stopped by SIGUSR1/SIGTERM (time limit, preemption) after every rank agreed
# and a checkpoint was written: the batch script requeues the job, which resumes from it.
REQUEUE_EXIT_CODE = 3
