"""Slurm batch templates: parse and render. Pure functions, no I/O (includes are read
through a callback), so rendering is checked against golden files.

A template (slurm/*.sbatch) is a bash script with a few `#@` lines the renderer consumes:

  #@include FILE                     FILE's lines here (same directory; one level deep)
  #@param NAME TYPE DEFAULT HELP...  a value the user may set (`--set NAME=VALUE`);
                                     DEFAULT `-` means required, `''` means empty
  #@default NAME VALUE               change an included parameter's default
  #@sbatch --FLAG[=VALUE]            an sbatch directive; dropped if a placeholder in it
                                     renders empty (optional partition, account, ...)
  #@if NAME / #@else / #@endif       the lines between (body, directives, includes) are
                                     kept only when parameter NAME is `true` (or, after
                                     #@else, when it is not); blocks may nest. A
                                     parameter declared in such a block may be set only
                                     where the block is kept (it would do nothing else)

and `{{NAME}}` placeholders. In the body every value is inserted shell-quoted
(shlex.quote), so no value can inject shell code. An #SBATCH line is a comment to bash, so
only a line break could make part of a value run; sbatch parses those lines itself, so
values there are quoted for sbatch's parser instead (sbatch_quote) and control characters
are refused. Slurm's own syntax (`gpu,gpu-long`, `skylake&ib`, `[rack1|rack2]`) goes in as
written. The rendered script is: the shebang, the directives sorted, then the body.

Computed placeholders (not settable): template, requeue_exit_code, site_setup (module
loads, environment activation, exports: generated, each value quoted), train_args (the
arguments after --, shlex-joined: hpcaccel.train's flags, or a --script's own), and for
sweeps array and sweep_json.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

from ..errors import REQUEUE_EXIT_CODE, UsageError

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a newline here would end an #SBATCH comment line
# What sbatch's reader of #SBATCH lines treats specially (Slurm's src/sbatch/opt.c,
# _get_argument): whitespace ends an argument, ' and " quote, \ escapes the next character
# and an unquoted # starts a comment. Everything else ($, ;, &, |, [ ]) is taken literally.
SBATCH_SPECIAL = re.compile(r"[\s'\"\\#]")
# sbatch reads either word anywhere in an #SBATCH line as a heterogeneous-job separator
SBATCH_SEPARATOR = re.compile(r"hetjob|packjob", re.IGNORECASE)
COMPUTED = ("template", "requeue_exit_code", "site_setup", "train_args", "array", "sweep_json")


def _time_seconds(text: str) -> int | None:
    """Seconds in a Slurm time limit: MINUTES, MM:SS, HH:MM:SS or D-HH[:MM[:SS]];
    None if malformed or zero (Slurm reads 0 as no limit, which defeats the warning)."""
    days, hms = 0, text
    if "-" in text:
        day_text, hms = text.split("-", 1)
        if not re.fullmatch(r"\d{1,3}", day_text) or not re.fullmatch(r"\d{1,2}(:\d{2}){0,2}", hms):
            return None
        days = int(day_text)
        hms += ":00" * (2 - hms.count(":"))  # D-HH and D-HH:MM
    if not re.fullmatch(r"\d{1,7}|\d{1,4}:\d{2}|\d{1,3}:\d{2}:\d{2}", hms):
        return None
    parts = [int(p) for p in hms.split(":")]
    if len(parts) == 1:
        parts = [0, parts[0], 0]  # plain minutes
    elif len(parts) == 2:
        parts = [0, *parts]       # MM:SS
    hours, minutes, seconds = parts
    if seconds > 59 or (len(hms.split(":")) == 3 and minutes > 59) or (days and hours > 23):
        return None
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return total or None


# type name -> (check(value) -> problem or None)
TYPES = {
    "posint": lambda v: None if re.fullmatch(r"[1-9][0-9]{0,8}", v) else "must be a positive integer",
    "count": lambda v: None if re.fullmatch(r"[0-9]{1,9}", v) else "must be a non-negative integer",
    "time": lambda v: None if _time_seconds(v) else "must be a time limit like HH:MM:SS, D-HH:MM:SS or MINUTES",
    "name": lambda v: None if re.fullmatch(r"[A-Za-z0-9_.\-]+", v) else "may contain only letters, digits and _ . -",
    "word": lambda v: None if v and not re.search(r"[\s\x00-\x1f\x7f]", v) else
    "must be one word (no spaces or control characters)",
    "words": lambda v: None if all(re.fullmatch(r"[A-Za-z0-9_.,:/%@+=\-]+", w) for w in v.split()) else
    "must be words of letters, digits and _ . , : / % @ + = - separated by spaces",
    "path": lambda v: None if v and "\n" not in v and "\0" not in v else "must be a non-empty path on one line",
}


@dataclass
class Param:
    name: str
    type: str
    default: str | None  # None: required
    help: str

    def check(self, value: str) -> str | None:
        if "|" in self.type:  # a choice: srun|mpirun
            return None if value in self.type.split("|") else f"must be one of {', '.join(self.type.split('|'))}"
        return TYPES[self.type](value)


@dataclass
class Template:
    name: str
    params: dict = field(default_factory=dict)      # name -> Param, in declaration order
    directives: list = field(default_factory=list)  # "--flag={{x}}" strings
    body: list = field(default_factory=list)         # lines, shebang first
    # per directive and body line: the #@if conditions it lies in, ((NAME, wanted), ...)
    directive_when: list = field(default_factory=list)
    body_when: list = field(default_factory=list)
    param_when: dict = field(default_factory=dict)   # name -> the #@if conditions it lies in

    @property
    def placeholders(self) -> set:
        text = "\n".join(self.directives + self.body)
        return set(PLACEHOLDER.findall(text))


def parse(name: str, text: str, read_include=None) -> Template:
    """Parse template `name` from `text`; read_include(file) -> text for #@include lines."""
    tpl = Template(name)
    _parse_into(tpl, text, read_include, f"template {name}", depth=0, conditions=[])
    named = {n for when in tpl.body_when + tpl.directive_when + list(tpl.param_when.values())
             for n, _ in when}
    if named - set(tpl.params):
        raise UsageError(f"template {name}: #@if of undeclared parameter "
                         f"{sorted(named - set(tpl.params))[0]!r}")
    unknown = tpl.placeholders - set(tpl.params) - set(COMPUTED)
    if unknown:
        raise UsageError(f"template {name}: unknown placeholder {{{{{sorted(unknown)[0]}}}}} "
                         f"(declare it with #@param)")
    return tpl


def _parse_into(tpl: Template, text: str, read_include, where: str, depth: int,
                conditions: list) -> None:
    """Lines of `text` into `tpl`; `conditions`: the open #@if blocks, [(NAME, wanted)]."""
    opened = len(conditions)
    for number, line in enumerate(text.splitlines(), 1):
        at = f"{where} line {number}"
        if not line.startswith("#@"):
            tpl.body.append(line)
            tpl.body_when.append(tuple(conditions))
            continue
        kind, _, rest = line[2:].partition(" ")
        rest = rest.strip()
        if kind == "if":
            if not ENV_NAME.fullmatch(rest):
                raise UsageError(f"{at}: expected #@if NAME")
            conditions.append((rest, True))
        elif kind in ("else", "endif"):
            if len(conditions) <= opened:
                raise UsageError(f"{at}: #@{kind} without #@if")
            name, wanted = conditions.pop()
            if kind == "else":
                conditions.append((name, not wanted))
        elif kind == "include":
            if depth or read_include is None:
                raise UsageError(f"{at}: #@include is allowed only in a template, one level deep")
            _parse_into(tpl, read_include(rest), read_include, f"{tpl.name}/{rest}", depth + 1,
                        conditions)
        elif kind == "param":
            parts = rest.split(None, 3)
            if len(parts) < 3 or not ENV_NAME.fullmatch(parts[0]):
                raise UsageError(f"{at}: expected #@param NAME TYPE DEFAULT HELP")
            pname, ptype, default = parts[:3]
            if ptype not in TYPES and "|" not in ptype:
                raise UsageError(f"{at}: unknown parameter type {ptype!r} ({', '.join(TYPES)} or a|b)")
            default = None if default == "-" else "" if default == "''" else default
            tpl.params[pname] = Param(pname, ptype, default, parts[3] if len(parts) > 3 else "")
            tpl.param_when[pname] = tuple(conditions)
        elif kind == "default":
            pname, _, value = rest.partition(" ")
            if pname not in tpl.params:
                raise UsageError(f"{at}: #@default of undeclared parameter {pname!r}")
            value = value.strip()
            tpl.params[pname].default = "" if value == "''" else value
        elif kind == "sbatch":
            if not rest.startswith("--"):
                raise UsageError(f"{at}: expected #@sbatch --FLAG[=VALUE]")
            tpl.directives.append(rest)
            tpl.directive_when.append(tuple(conditions))
        else:
            raise UsageError(f"{at}: unknown line #@{kind}")
    if len(conditions) > opened:
        raise UsageError(f"{where}: #@if {conditions[-1][0]} without #@endif")


def _kept(when, values: dict) -> bool:
    """Do `values` keep a line under the #@if conditions `when`, ((NAME, wanted), ...)?"""
    return all((values.get(name) == "true") == wanted for name, wanted in when)


def resolve(tpl: Template, settings: dict, flag_names: dict | None = None) -> dict:
    """Check user settings {name: (value, flag that set it)} and fill in defaults.
    Errors name the flag the user typed; a parameter the user did not set is named as
    `flag_names` spells it (e.g. {"elastic": "--elastic"}), else `--set NAME`."""
    def flag(pname: str) -> str:
        if pname in settings:
            return settings[pname][1]
        return (flag_names or {}).get(pname, f"--set {pname}")

    values = {}
    for pname, (value, given) in settings.items():
        if pname in COMPUTED:
            raise UsageError(f"{given}: {pname} is computed by the renderer and cannot be set")
        if pname not in tpl.params:
            raise UsageError(f"{given}: template {tpl.name} has no parameter {pname!r} "
                             f"(python -m hpcaccel.slurm params {tpl.name} lists them)")
        value, param = str(value), tpl.params[pname]
        # an optional parameter (default '') may be set empty; anything else must check out
        problem = None if value == "" == param.default else param.check(value)
        if problem:
            raise UsageError(f"{given}: {pname} {problem}, got {value!r}")
        values[pname] = value
    for pname, param in tpl.params.items():
        if pname not in values:
            if param.default is None:
                raise UsageError(f"--set {pname}=VALUE is required by template {tpl.name}: {param.help}")
            values[pname] = param.default
    for pname in settings:  # e.g. --min-nodes without --elastic: set, but it would do nothing
        when = tpl.param_when.get(pname, ())
        if not _kept(when, values):
            name, wanted = next((n, w) for n, w in when if (values.get(n) == "true") != w)
            need = flag(name) if wanted else f"--set {name}=false"
            raise UsageError(f"{flag(pname)}: {pname} is used only with {need}: add "
                             f"{need} or drop {flag(pname).split('=')[0]}")
    if "time" in values and "signal_seconds" in values:
        limit, warn = _time_seconds(values["time"]), int(values["signal_seconds"])
        if warn >= limit:
            if "signal_seconds" in settings:
                raise UsageError(f"{flag('signal_seconds')}: signal_seconds ({warn}) must be less "
                                 f"than the time limit ({values['time']} = {limit} s)")
            raise UsageError(f"{flag('time')}: the time limit ({values['time']} = {limit} s) must "
                             f"be longer than signal_seconds ({warn}); lower it with --set "
                             f"signal_seconds=N")
    if values.get("min_nodes") and values.get("nodes") and int(values["min_nodes"]) > int(values["nodes"]):
        raise UsageError(f"{flag('min_nodes')}: min_nodes ({values['min_nodes']}) must not be "
                         f"more than nodes ({values['nodes']})")
    return values


def directive_value(tpl: Template, values: dict, flag: str) -> str | None:
    """The value the template's own directive `flag` (e.g. --ntasks-per-node) renders to
    with `values` (from resolve); None where the template has none, or it renders empty."""
    for directive, when in zip(tpl.directives, tpl.directive_when):
        name, sep, value = directive.partition("=")
        if name == flag and sep and _kept(when, values):
            return PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), value) or None
    return None


def site_setup(values: dict, env: dict) -> str:
    """The site block: modules, a site script, conda/venv activation, exports. Quoted."""
    q = shlex.quote
    lines = []
    if values.get("modules"):
        lines.append("module load " + " ".join(q(m) for m in values["modules"].split()))
    if values.get("setup_script"):
        lines.append(f"source {q(values['setup_script'])}")
    if values.get("conda_env"):
        lines.append('eval "$(conda shell.bash hook)"')
        lines.append(f"conda activate {q(values['conda_env'])}")
    if values.get("venv"):
        lines.append(f"source {q(values['venv'].rstrip('/') + '/bin/activate')}")
    for key, value in env.items():
        if not ENV_NAME.fullmatch(key):
            raise UsageError(f"--env {key}=...: not a valid environment variable name")
        lines.append(f"export {key}={q(value)}")
    return "\n".join(lines) if lines else "# (no site set-up given)"


def render(tpl: Template, settings: dict | None = None, train_args=(), env: dict | None = None,
           extra_directives=(), sweep: list | None = None, flag_names: dict | None = None) -> str:
    """The ready sbatch script.

    settings: {param: (value, flag)}; train_args: flags for hpcaccel.train (or a script's
    arguments), inserted as given (commands.check_train_flags checks train flags: what the
    template owns, a sweep's keys);
    env: exports;
    extra_directives: further "--flag=value" strings; sweep: a list of config dicts (one
    per array task) for templates that run sweeps; flag_names: how errors name parameters
    the user did not set (resolve).
    """
    values = resolve(tpl, settings or {}, flag_names)
    uses_sweep = "sweep_json" in tpl.placeholders
    if uses_sweep and not sweep:
        raise UsageError(f"--sweep FILE is required by template {tpl.name}")
    if sweep and not uses_sweep:
        raise UsageError(f"--sweep: template {tpl.name} does not run sweeps (use the sweep template)")
    computed = {
        "template": tpl.name,
        "requeue_exit_code": str(REQUEUE_EXIT_CODE),
        "site_setup": site_setup(values, env or {}),
        "train_args": shlex.join(train_args),
    }
    if sweep:
        last = f"0-{len(sweep) - 1}" if len(sweep) > 1 else "0"
        limit = values.get("max_parallel", "0")
        computed["array"] = last + (f"%{limit}" if limit not in ("", "0") else "")
        computed["sweep_json"] = json.dumps(sweep, separators=(",", ":"), sort_keys=True)
    raw = {"site_setup", "train_args"}  # built above from quoted pieces

    def kept(when) -> bool:
        return _kept(when, values)

    directives = []
    flag_of = {pname: flag for pname, (_, flag) in (settings or {}).items()}
    ours = [d for d, when in zip(tpl.directives, tpl.directive_when) if kept(when)]
    for d in ours + [_extra(e) for e in extra_directives]:
        line, empty = _fill_directive(d, values, computed, flag_of)
        if not empty:
            directives.append(line)
    flags = [d.split("=", 1)[0] for d in directives]
    twice = sorted({f for f in flags if flags.count(f) > 1})
    if twice:
        raise UsageError(f"--sbatch {twice[0]}: already set by template {tpl.name} "
                         f"(set its parameter instead)")

    def fill(match):
        pname = match.group(1)
        if pname in raw:
            return computed[pname]
        return shlex.quote(computed[pname] if pname in computed else values[pname])

    body = [PLACEHOLDER.sub(fill, line) for line, when in zip(tpl.body, tpl.body_when)
            if kept(when)]
    shebang = body.pop(0) if body and body[0].startswith("#!") else "#!/bin/bash"
    sbatch = [f"#SBATCH {d}" for d in sorted(directives)]
    return "\n".join([shebang, *sbatch, "", *body]).rstrip("\n") + "\n"


def sbatch_quote(value: str, flag: str) -> str:
    """`value` written so that sbatch reads it back from an #SBATCH line unchanged: as it is
    where nothing in it is special to sbatch's parser, else in double quotes with \\, ", '
    and # escaped by a backslash (read the same by Slurm's parsers before and after 17.11).
    Refused: control characters (a newline would start a shell line) and sbatch's
    hetjob/packjob separator words. `flag` names the user's flag in the error."""
    if CONTROL.search(value):
        raise UsageError(f"{flag}: {value!r} must be one line without control characters "
                         f"(it goes into an #SBATCH line)")
    if SBATCH_SEPARATOR.search(value):
        raise UsageError(f"{flag}: {value!r} contains {SBATCH_SEPARATOR.search(value).group(0)!r}, "
                         f"which sbatch reads as a job separator in an #SBATCH line")
    if not SBATCH_SPECIAL.search(value):
        return value
    return '"' + re.sub(r"""([\\"'#])""", r"\\\1", value) + '"'


def _extra(directive: str) -> str:
    """--sbatch values: `--flag=value`, `flag=value` or `--flag`; the value quoted for sbatch."""
    text = directive if directive.startswith("--") else "--" + directive
    flag, sep, value = text.partition("=")
    if not re.fullmatch(r"--[a-z][a-z0-9-]*", flag):
        raise UsageError(f"--sbatch {directive}: not an sbatch option name")
    return flag + sep + sbatch_quote(value, f"--sbatch {flag}") if sep else flag


def _fill_directive(directive: str, values: dict, computed: dict, flag_of: dict) -> tuple[str, bool]:
    empty = False

    def fill(match):
        nonlocal empty
        pname = match.group(1)
        value = computed.get(pname, values.get(pname, ""))
        if value == "":
            empty = True
        return sbatch_quote(value, flag_of.get(pname, f"--set {pname}"))

    return PLACEHOLDER.sub(fill, directive), empty
