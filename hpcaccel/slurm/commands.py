"""Slurm batch scripts for hpcaccel: render a template, submit it, collect a sweep.

  python -m hpcaccel.slurm templates
  python -m hpcaccel.slurm params cpu
  python -m hpcaccel.slurm render cpu --nodes 2 --time 02:00:00 --partition cpu \\
      --set cores_per_socket=32 --set venv=/path/venv -- --data /scratch/ds/index.json
  python -m hpcaccel.slurm submit cpu ...same...              # prints the job id
  python -m hpcaccel.slurm render cpu --set cores_per_socket=32 --script train.py -- --epochs 20
  python -m hpcaccel.slurm render cpu --elastic --nodes 4 --min-nodes 2 --max-restarts 3 \\
      --set cores_per_socket=32 -- --data /scratch/ds/index.json --batch-size 24  # goes on when nodes fail
  python -m hpcaccel.slurm submit sweep --sweep lr.toml -- --epochs 20
  python -m hpcaccel.slurm collect runs/hpcaccel-sweep-1234 [--format md|csv] [--rank-by test_r2]

Templates are slurm/NAME.sbatch (or any path to one; `templates` lists the installed ones); `--set KEY=VALUE` sets a template
parameter (`params` lists them), `--env NAME=VALUE` exports a variable in the job,
`--sbatch FLAG=VALUE` adds a directive, and everything after `--` goes to
`python -m hpcaccel.train`, or with `--script PATH` (cpu, gpu) to your own training script,
which then runs instead. Bad input: one line naming the flag, exit code 2.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

from . import elastic as slurm_elastic
from . import sweep as slurm_sweep
from . import template as slurm_template
from ..cli import Parser, usage_error
from ..errors import UsageError


def _template_dir() -> str:
    """The templates' source is the top-level slurm/ directory of the repository.
    pyproject.toml ships it as package data, hpcaccel/slurm/templates/, in a wheel or a
    non-editable install; in a source checkout (or an editable install, which runs from
    it) that directory does not exist and slurm/ next to the package is used.
    HPCACCEL_SLURM_TEMPLATES points elsewhere (a site's own templates)."""
    here = os.path.dirname(os.path.abspath(__file__))
    packaged = os.path.join(here, "templates")
    if os.path.isdir(packaged):
        return packaged
    return os.path.join(os.path.dirname(os.path.dirname(here)), "slurm")


TEMPLATE_DIR = os.environ.get("HPCACCEL_SLURM_TEMPLATES") or _template_dir()
# shortcuts for common parameters: --nodes N is --set nodes=N
SHORTCUTS = ("nodes", "time", "partition", "account", "job_name", "script", "min_nodes",
             "max_restarts")
# how errors name a parameter the user did not set: as the flag one would type
FLAG_NAMES = {**{key: "--" + key.replace("_", "-") for key in SHORTCUTS}, "elastic": "--elastic"}


def template_path(name: str) -> str:
    if os.sep in name or name.endswith(".sbatch"):
        path = name
    else:
        path = os.path.join(TEMPLATE_DIR, name + ".sbatch")
    if not os.path.isfile(path):
        known = ", ".join(list_templates()) or f"none in {TEMPLATE_DIR}"
        raise UsageError(f"template {name}: no such template (known: {known})")
    return path


def list_templates() -> list[str]:
    try:
        names = os.listdir(TEMPLATE_DIR)
    except OSError:
        return []
    return sorted(n[:-7] for n in names if n.endswith(".sbatch") and not n.startswith("_"))


def load_template(name: str) -> slurm_template.Template:
    path = template_path(name)
    base = os.path.dirname(os.path.abspath(path))

    def read_include(file: str) -> str:
        inc = os.path.join(base, file)
        if os.path.dirname(os.path.abspath(inc)) != base:
            raise UsageError(f"template {name}: #@include {file}: only files next to the template")
        try:
            with open(inc) as fh:
                return fh.read()
        except OSError as e:
            raise UsageError(f"template {name}: #@include {file}: {e.strerror}") from None

    with open(path) as fh:
        text = fh.read()
    return slurm_template.parse(os.path.basename(path)[:-7] if path.endswith(".sbatch") else name,
                                text, read_include)


def _pairs(items, flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {item}: expected KEY=VALUE")
        out.append((key.strip(), value))
    return out


# Train flags the templates own: they would break requeue/resume or the sweep's layout.
RESERVED_TRAIN_FLAGS = {
    "out": "the template sets it; use --set run_dir=DIR (sweeps: --set sweep_dir=DIR)",
    "resume": "the template resumes with --resume auto after a requeue",
}


def check_train_flags(train_args: list, sweep: list | None, sweep_path: str | None):
    """Parse the train flags (and each sweep entry with them) as the job will, so a typo
    fails now rather than after hours in the queue. What the template owns is checked on
    the parsed values, not on the spelling, so neither `--out=X` nor a --config file
    setting `out` can override the template's --out and --resume. Returns the parsed
    TrainConfig (None for a sweep, whose entries differ)."""
    from ..config import given_values, parse_args

    try:
        given, config_path = given_values(train_args, quiet=True)
    except UsageError as e:
        raise UsageError(f"train flags (after --): {e}") from None
    where = f"after --, in --config {config_path}" if config_path else "after --"
    swept = {key for entry in sweep or () for key in entry}
    for name in given:
        flag = "--" + name.replace("_", "-")
        if name in RESERVED_TRAIN_FLAGS:
            raise UsageError(f"{flag} ({where}): {RESERVED_TRAIN_FLAGS[name]}")
        if name in swept:
            raise UsageError(f"{flag} ({where}): the sweep file sets {name} per task; "
                             f"set it in the sweep file or drop it here")

    def parse(extra, where):
        try:
            return parse_args(extra + train_args, quiet=True)
        except UsageError as e:  # the temporary file's name means nothing to the user
            message = str(e).replace(f"--config {extra[-1]}: ", "") if extra else str(e)
            raise UsageError(f"{where}: {message}") from None

    if not sweep:
        return parse([], "train flags (after --)")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(len(sweep)):
            path = os.path.join(tmp, f"entry-{i}.toml")
            with open(path, "w") as fh:
                fh.write(slurm_sweep.entry_toml(sweep, i))
            parse(["--config", path], f"--sweep {sweep_path}: entry {i}")
    return None


def check_elastic(tpl, settings: dict, train) -> None:
    """An elastic job must have a node to lose, and every node count it may go on with
    must keep the run's global batch (slurm/elastic.py); `train`: the parsed train flags."""
    values = slurm_template.resolve(tpl, settings, FLAG_NAMES)
    ranks = slurm_template.directive_value(tpl, values, "--ntasks-per-node")
    slurm_elastic.check(int(values["nodes"]), int(values["min_nodes"]), int(ranks or 1),
                        train.batch_size, train.accum_steps, settings["elastic"][1],
                        settings.get("min_nodes", (None, None))[1])


def render_from_args(args) -> str:
    tpl = load_template(args.template)
    settings = {}
    for key in SHORTCUTS:
        value = getattr(args, key)
        if value is not None:
            settings[key] = (value, f"--{key.replace('_', '-')}")
    if args.elastic:
        settings["elastic"] = ("true", "--elastic")
    for key, value in _pairs(args.set, "--set"):
        if key in settings:
            raise UsageError(f"--set {key}: given twice (also as {settings[key][1]})")
        settings[key] = (value, f"--set {key}")
    sweep = slurm_sweep.load(args.sweep) if args.sweep else None
    train_args = list(args.train_args)
    rendered = slurm_template.render(tpl, settings, train_args, dict(_pairs(args.env, "--env")),
                                     args.sbatch or (), sweep, FLAG_NAMES)
    elastic = settings.get("elastic", ("false",))[0] == "true"
    if settings.get("script"):  # the arguments after -- are the script's own
        if elastic:
            raise UsageError(f"{settings['elastic'][1]}: relaunches hpcaccel.train, which "
                             f"continues a checkpoint on fewer nodes; a --script cannot be "
                             f"relaunched that way (drop --elastic, or train with hpcaccel.train)")
        check_script(*settings["script"], (settings.get("chdir") or ("", ""))[0])
    else:
        train = check_train_flags(train_args, sweep, args.sweep)
        if elastic:
            check_elastic(tpl, settings, train)
    return rendered


def check_script(path: str, flag: str, chdir: str = "") -> None:
    """The script must exist where the job starts (--set chdir, or where sbatch runs), so a
    typo fails now rather than after the queue."""
    where = os.path.join(chdir, path) if chdir else path
    if not os.path.isfile(where):
        raise UsageError(f"{flag}: {path}: no such file" + (f" in --set chdir {chdir}" if chdir
                                                             else "") +
                         " (the job starts the script from there)")


def submit(script: str, sbatch: str = "sbatch") -> str:
    """sbatch the script (on stdin, so Slurm keeps its own copy); return the job id."""
    try:
        r = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True)
    except FileNotFoundError:
        raise UsageError("submit: sbatch not found (not on a Slurm login node? try render)") from None
    if r.returncode != 0:
        raise RuntimeError(f"sbatch failed (exit {r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]


def build_parser() -> Parser:
    parser = Parser(prog="python -m hpcaccel.slurm", description=__doc__.splitlines()[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="\n".join(__doc__.splitlines()[2:]))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("render", "print a ready sbatch script"),
                       ("submit", "render and sbatch it; print the job id")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("template", help="template name (slurm/NAME.sbatch) or path")
        p.add_argument("--nodes", help="nodes (--set nodes=N)")
        p.add_argument("--time", help="wall-clock limit HH:MM:SS (--set time=...)")
        p.add_argument("--partition", help="partition (--set partition=...)")
        p.add_argument("--account", help="account (--set account=...)")
        p.add_argument("--job-name", dest="job_name", help="job name (--set job_name=...)")
        p.add_argument("--script", help="your own training script (--set script=PATH): runs "
                       "instead of hpcaccel.train, with the arguments after --")
        p.add_argument("--elastic", action="store_true", help="cpu, gpu: when nodes fail, go "
                       "on with the nodes left from the last checkpoint, same global batch "
                       "(--set elastic=true)")
        p.add_argument("--min-nodes", dest="min_nodes", help="--elastic: go on while at least "
                       "this many nodes are left (--set min_nodes=N)")
        p.add_argument("--max-restarts", dest="max_restarts", help="requeue (and, --elastic, "
                       "relaunch after lost nodes) at most this many times (--set max_restarts=N)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a template parameter")
        p.add_argument("--env", action="append", metavar="NAME=VALUE", help="export in the job")
        p.add_argument("--sbatch", action="append", metavar="FLAG=VALUE", help="an extra sbatch directive")
        p.add_argument("--sweep", metavar="FILE", help="sweep file (.toml, .json, .csv) for the sweep template")
    p = sub.add_parser("collect", help="one table of every sweep task's summary.json")
    p.add_argument("sweep_dir")
    p.add_argument("--format", choices=("md", "csv"), default="md")
    p.add_argument("--rank-by", dest="rank_by", metavar="METRIC",
                   help="sort the tasks by this summary.json metric, best first (any task's: "
                   "test_accuracy, test_r2, test_rmse, test_mean_iou, final_train_loss, ...)")
    p.add_argument("--order", choices=("auto", "ascending", "descending"), default="auto",
                   help="--rank-by's order; auto: ascending for losses, errors (rmse, mae) and "
                   "times, descending for the rest")
    p = sub.add_parser("templates", help="list the templates")
    p = sub.add_parser("params", help="list a template's parameters")
    p.add_argument("template")
    p = sub.add_parser("sweep-entry", help="(used by the sweep template) print entry INDEX "
                       "of a sweep as a TOML config")
    p.add_argument("sweep", help="sweep file, or - for the JSON list on stdin")
    p.add_argument("index", type=int)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after the first -- is for hpcaccel.train (or --script), untouched here
    cut = argv.index("--") if "--" in argv else len(argv)
    try:
        args = build_parser().parse_args(argv[:cut])
        args.train_args = argv[cut + 1:]
        if args.train_args and args.command not in ("render", "submit"):
            raise UsageError(f"{args.command}: takes no train flags (nothing goes after --)")
        return run(args)
    except UsageError as e:
        return usage_error("hpcaccel.slurm", e)
    except RuntimeError as e:
        print(f"hpcaccel.slurm: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    if args.command == "render":
        sys.stdout.write(render_from_args(args))
    elif args.command == "submit":
        print(submit(render_from_args(args)))
    elif args.command == "collect":
        columns, rows, notes = slurm_sweep.collect(args.sweep_dir, args.rank_by, args.order)
        sys.stdout.write(slurm_sweep.table(columns, rows, args.format))
        for note in notes:
            print(f"hpcaccel.slurm: {note}", file=sys.stderr)
    elif args.command == "templates":
        for name in list_templates():
            print(name)
    elif args.command == "params":
        for p in load_template(args.template).params.values():
            default = "(required)" if p.default is None else shlex.quote(p.default) if p.default else "''"
            print(f"{p.name:16} {p.type:12} {default:12} {p.help}")
    elif args.command == "sweep-entry":
        import json
        if args.sweep == "-":
            try:
                entries = json.loads(sys.stdin.read())
            except ValueError as e:
                raise UsageError(f"sweep-entry: stdin is not a JSON list: {e}") from None
        else:
            entries = slurm_sweep.load(args.sweep)
        sys.stdout.write(slurm_sweep.entry_toml(entries, args.index))
    return 0
