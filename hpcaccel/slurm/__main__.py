"""python -m hpcaccel.slurm: see hpcaccel/slurm/commands.py."""
import sys

from .commands import main

sys.exit(main())
