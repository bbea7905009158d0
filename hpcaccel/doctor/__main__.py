"""python -m hpcaccel.doctor: see hpcaccel/doctor/__init__.py."""
from __future__ import annotations

import sys
import traceback

from ..cli import Parser, boolean, usage_error
from ..errors import UsageError
from . import __doc__ as DOC

PROG = "hpcaccel.doctor"


def parse_args(argv, quiet: bool):
    p = Parser(prog="python -m hpcaccel.doctor", description=DOC.splitlines()[0], quiet=quiet)
    p.add_argument("--data", help="training data to check: every rank opens it and must see "
                   "the same samples (an HDF5 file or a shard index.json); the built-in "
                   "sources (digits, synthetic) are valid as they are")
    p.add_argument("--out", help="output directory to check: rank 0 writes a file there and "
                   "every host must see it (resume needs a shared --out); removed afterwards. "
                   "Also whether hpcaccel.train would start there under --resume and "
                   "--overwrite (a live run's lock, another run's outputs)")
    p.add_argument("--resume", default="none", help="with --out: the --resume you give "
                   "hpcaccel.train (none, auto or a checkpoint path)")
    p.add_argument("--overwrite", type=boolean, default=False, metavar="{true,false}",
                   help="with --out: the --overwrite you give hpcaccel.train")
    p.add_argument("--threads", type=int, help="intra-op threads per rank, as you would give "
                   "hpcaccel.train (default: from CPU affinity)")
    p.add_argument("--grad-mb", type=float, help="gradient size per step (MiB): predict step "
                   "time and efficiency from the probe (with --compute-ms)")
    p.add_argument("--compute-ms", type=float, help="compute time per step on one rank (ms)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    if (args.grad_mb is None) != (args.compute_ms is None):
        raise UsageError("--grad-mb and --compute-ms go together")
    if args.grad_mb is not None and (args.grad_mb <= 0 or args.compute_ms <= 0):
        raise UsageError("--grad-mb and --compute-ms must be positive")
    return args


def main(argv=None) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    try:
        # every rank parses the same argv, so all reach the same verdict without talking
        args = parse_args(sys.argv[1:] if argv is None else argv, quiet=rank != 0)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UsageError as e:
        return usage_error(PROG, e) if rank == 0 else UsageError.exit_code
    from .report import run

    try:
        return 1 if run(args, comm) else 0
    except BaseException as e:  # noqa: BLE001 - one rank failing must end every rank
        sys.stderr.write(f"{PROG}: rank {rank} failed: {type(e).__name__}: {e}\n"
                         + "".join(traceback.format_exception(e)))
        sys.stderr.flush()
        comm.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
