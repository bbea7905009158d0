"""Slurm batch scripts: `template` parses and renders the slurm/*.sbatch templates (pure
functions), `sweep` reads sweep files and collects their results, `commands` is the
`python -m hpcaccel.slurm` command line (render, submit, collect, templates, params)."""
from .commands import TEMPLATE_DIR, load_template, main

__all__ = ["TEMPLATE_DIR", "load_template", "main"]
