"""python -m hpcaccel.horovod SCRIPT [ARGS...] | -m MODULE [ARGS...]: run a Horovod PyTorch
script with `horovod` resolving to hpcaccel.torch (see hpcaccel/horovod/__init__.py)."""
from __future__ import annotations

import os
import runpy
import sys

USAGE = ("usage: python -m hpcaccel.horovod SCRIPT [ARGS...]  or  python -m hpcaccel.horovod "
         "-m MODULE [ARGS...]\nRuns a Horovod PyTorch script on hpcaccel.torch, unchanged.")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    module = None
    if argv[0] == "-m":
        if len(argv) < 2:
            print("hpcaccel.horovod: -m needs a module name", file=sys.stderr)
            return 2
        module, args = argv[1], argv[2:]
    else:
        script, args = argv[0], argv[1:]
        if not os.path.isfile(script):
            print(f"hpcaccel.horovod: {script}: no such script", file=sys.stderr)
            return 2
    from . import install
    install()
    if module is not None:
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
