"""The commands the docs show, checked against the code, so a doc that drifts fails CI.

Every `python -m hpcaccel.X ...` line in the README's and docs/' code blocks (and inline code)
is extracted: train flags must parse with the real train parser (names, types, choices),
every flag of another command must be in that command's --help, and the cheap ones
(`bench predict`, packing a built-in source) are run. Links must point at files in the
repository, never outside it.
"""
import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from hpcaccel import config
from hpcaccel.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
COMMAND = re.compile(r"python -m (hpcaccel(?:\.[a-z]+)?)\b(.*)")


def code_lines(path):
    """Lines of fenced code blocks (continuations joined, `$ ` prompts dropped) and inline
    code spans."""
    text = open(path).read()
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [(l[2:] if l.startswith("$ ") else l, False) for l in joined.splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [(l, True) for l in re.findall(r"`([^`\n]*python -m hpcaccel[^`\n]*)`", prose)]
    return lines


def documented_commands():
    found = []
    for path in DOCS:
        for line, inline in code_lines(path):
            m = COMMAND.search(re.split(r"(?:^|\s)#(?:\s|$)", line)[0])  # not in comments
            if not m:
                continue
            rest = re.split(r"\s#\s|\s#$|\s\|\s|\s>\s|&&|;|'", m.group(2))[0]
            if "..." in rest or "$" in rest or "{{" in rest or "<" in rest:
                continue  # a placeholder, not a command
            rest = rest.replace("[", " ").replace("]", " ")
            # an inline mention may name a flag without its value: flag names only
            if not (inline and m.group(1) == "hpcaccel.train"):
                found.append((os.path.relpath(path, ROOT), m.group(1), shlex.split(rest)))
            else:
                FLAG_MENTIONS.extend(a for a in shlex.split(rest) if a.startswith("--"))
    return found


FLAG_MENTIONS = []
COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_tool():
    modules = {m for _, m, _ in COMMANDS}
    assert {"hpcaccel.train", "hpcaccel.data", "hpcaccel.bench", "hpcaccel.slurm",
            "hpcaccel.doctor"} <= modules, modules


TRAIN = [(f, a) for f, m, a in COMMANDS if m == "hpcaccel.train"]
SLURM_TRAIN_ARGS = [(f, a[a.index("--") + 1:]) for f, m, a in COMMANDS
                    if m == "hpcaccel.slurm" and "--" in a]


@pytest.mark.parametrize("doc,args", TRAIN + SLURM_TRAIN_ARGS,
                         ids=[" ".join(a)[:60] or "(none)" for _, a in TRAIN + SLURM_TRAIN_ARGS])
def test_documented_train_flags_parse(doc, args):
    if args == ["--help"]:
        return
    try:
        config.build_parser(quiet=True).parse_args(args)
    except UsageError as e:
        pytest.fail(f"{doc}: `python -m hpcaccel.train {' '.join(args)}`: {e}")


def test_train_flags_mentioned_inline_exist():
    known = {s for a in config.build_parser(quiet=True)._actions for s in a.option_strings}
    assert FLAG_MENTIONS and set(FLAG_MENTIONS) <= known, set(FLAG_MENTIONS) - known


@functools.lru_cache(maxsize=None)
def _help(module, sub):
    r = subprocess.run([sys.executable, "-m", module, *([sub] if sub else []), "--help"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


# hpcaccel.horovod's arguments are the user's script and its own arguments
OTHERS = [(f, m, a) for f, m, a in COMMANDS
          if m not in ("hpcaccel.train", "hpcaccel", "hpcaccel.horovod")]


def test_documented_horovod_launches_name_a_script_or_module():
    launches = [(f, a) for f, m, a in COMMANDS if m == "hpcaccel.horovod"]
    assert launches, "the docs show no python -m hpcaccel.horovod command"
    assert "usage:" in _help("hpcaccel.horovod", None)
    for doc, args in launches:
        if not args:
            continue  # the command named in prose, without a script
        placeholder = args[0].isupper()  # SCRIPT, as in a usage line
        assert args and (placeholder or args[0] == "-m" and len(args) > 1
                         or args[0].endswith(".py")), (doc, args)


@pytest.mark.parametrize("doc,module,args", OTHERS,
                         ids=[f"{m[9:]} {' '.join(a)}"[:60] for _, m, a in OTHERS])
def test_documented_flags_exist(doc, module, args):
    sub = args[0] if args and not args[0].startswith("-") and module != "hpcaccel.doctor" else None
    before = args[:args.index("--")] if "--" in args else args
    text = _help(module, sub)
    for flag in (a.split("=")[0] for a in before if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", text), \
            f"{doc}: `python -m {module} {' '.join(args)}`: {flag} is not in its --help"


@pytest.mark.parametrize("args", [a for _, m, a in COMMANDS if m == "hpcaccel.bench"
                                  and a[:1] == ["predict"] and "--grad-mb" in a])
def test_documented_predict_commands_run(args):
    r = subprocess.run([sys.executable, "-m", "hpcaccel.bench", *args], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "| ranks | allreduce (ms) | step (ms) | efficiency |" in r.stdout


def test_documented_digits_pack_runs(tmp_path):
    (args,) = [a for _, m, a in COMMANDS if m == "hpcaccel.data" and "digits" in a and "pack" in a]
    args = [str(tmp_path / os.path.basename(a)) if a.endswith(".h5") else a for a in args]
    r = subprocess.run([sys.executable, "-m", "hpcaccel.data", *args], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(tmp_path)) == 1


def test_the_doctor_accepts_trains_data_defaults():
    """`--data` as training takes it by default (the built-in sources): the doctor, run as
    the docs show it, must not call it a problem."""
    from hpcaccel.data import BUILTINS

    sources = {config.TrainConfig.data, *BUILTINS}
    shown = {a[a.index("--data") + 1] for _, m, a in COMMANDS
             if m == "hpcaccel.doctor" and "--data" in a[:-1]}
    assert sources & shown, "the docs show no doctor command with a built-in --data"
    for source in sorted(sources):
        r = subprocess.run([sys.executable, "-m", "hpcaccel.doctor", "--data", source],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode in (0, 1) and "hpcaccel doctor:" in r.stdout, r.stderr
        assert f"data: {source}: a built-in source" in r.stdout
        assert not [l for l in r.stdout.splitlines() if l.startswith("PROBLEM: --data")], r.stdout


def test_make_train_command_matches_the_makefile():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    (line,) = [l for l in makefile.splitlines() if "-m hpcaccel.train" in l]
    args = shlex.split(line.split("-m hpcaccel.train", 1)[1].replace("$(ARGS)", ""))
    config.build_parser(quiet=True).parse_args(args)
    quickstart = open(os.path.join(ROOT, "docs", "quickstart.md")).read()
    assert f"mpirun -np 8 python -m hpcaccel.train {' '.join(args)}" in quickstart


@pytest.mark.parametrize("path", DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_links_point_inside_the_repository(path):
    text = open(path).read()
    assert "notes/" not in text, f"{path}: points at notes/, which is not in the repository"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        assert os.path.exists(os.path.join(os.path.dirname(path), target)), \
            f"{os.path.relpath(path, ROOT)}: link to {target}, which does not exist"


def test_predict_never_ignores_a_results_folder_it_was_given(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcaccel.bench", "predict", "--grad-mb", "10",
                        "--compute-ms", "50", "--results", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"hpcaccel.bench: error: --results {tmp_path / 'none'}: no allreduce")
