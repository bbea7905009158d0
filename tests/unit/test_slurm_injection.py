"""Values cannot inject shell code into a rendered script, and its signal/requeue logic
decides right. The rendered scripts are run by bash with stand-ins for srun and scontrol
on PATH (the real ones are exercised in tests/slurm)."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hpcaccel import slurm

from hpcaccel.config import tomllib

NASTY = ["$(touch PWNED)", "`touch PWNED`", "'; touch PWNED; '", '"; touch PWNED; "',
         "a b\nc", "x;touch PWNED", "$HOME ${PATH} \\ *", "-n"]

SRUN = """#!/bin/bash
# stand-in srun: record argv and environment, then behave as told by $STUB_MODE
out=$STUB_OUT
printf '%s\\0' "$@" > "$out/argv"
env -0 > "$out/env"
case ${STUB_MODE:-ok} in
  ok) exit 0 ;;
  checkpointed) exit 3 ;;
  wait-usr1)  # like the ranks: stop on USR1, "checkpoint", exit 3
    trap 'echo usr1 >> "$out/signals"; exit 3' USR1
    touch "$out/started"
    for _ in $(seq 200); do sleep 0.05; done; exit 0 ;;
esac
"""
SCONTROL = """#!/bin/bash
printf '%s\\n' "$*" >> "$STUB_OUT/scontrol"
"""


def render(argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert slurm.main(["render", *argv]) == 0
    return buf.getvalue()


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "stub-out"
    out.mkdir()
    return bin_dir, out


def start(script: str, tmp_path, stubs, mode="ok", restarts=0, **extra_env):
    bin_dir, out = stubs
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "STUB_OUT": str(out),
           "STUB_MODE": mode, "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "job", "SLURM_NTASKS": "2",
           "SLURM_CPUS_PER_TASK": "4", "SLURM_JOB_NODELIST": "n1", "SLURM_RESTART_COUNT": str(restarts),
           **extra_env}
    return subprocess.Popen(["bash", str(path)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run(script, tmp_path, stubs, **kw):
    proc = start(script, tmp_path, stubs, **kw)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def argv_of(stubs):
    return (stubs[1] / "argv").read_text().split("\0")[:-1]


@pytest.mark.parametrize("nasty", NASTY)
def test_values_reach_the_job_verbatim_and_run_nothing(nasty, tmp_path, stubs):
    one_line = nasty.replace("\n", " ")  # paths are one line (a newline is refused)
    venv = tmp_path / f"venv {one_line}"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text('export ACTIVATED="$BASH_SOURCE"\n')
    run_dir = str(tmp_path / f"run {one_line}")
    script = render(["cpu", "--set", "cores_per_socket=4", "--set", f"venv={venv}",
                     "--set", f"run_dir={run_dir}", "--env", f"NASTY={nasty}",
                     "--", f"--model={nasty}"])
    rc, out = run(script, tmp_path, stubs)
    assert rc == 0, out
    assert not list(tmp_path.rglob("PWNED")), out
    argv = argv_of(stubs)
    assert argv[-1] == f"--model={nasty}"
    assert argv[argv.index("--out") + 1] == run_dir
    assert argv[argv.index("--threads") + 1] == "4"
    env = dict(e.split("=", 1) for e in (stubs[1] / "env").read_text().split("\0") if "=" in e)
    assert env["NASTY"] == nasty
    assert env["ACTIVATED"] == str(venv / "bin" / "activate")
    assert env["OMP_NUM_THREADS"] == env["SRUN_CPUS_PER_TASK"] == "4"


def test_sweep_values_reach_the_task_verbatim(tmp_path, stubs):
    sweep = tmp_path / "s.json"
    sweep.write_text(json.dumps([{"data": "'$(touch PWNED)'\n`x`"}, {"data": "ok"}]))
    sweep_dir = tmp_path / "sweep"
    script = render(["sweep", "--sweep", str(sweep), "--set", f"sweep_dir={sweep_dir}",
                     "--set", f"python={sys.executable}"])
    rc, out = run(script, tmp_path, stubs, SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_JOB_ID="7")
    assert rc == 0, out
    assert not list(tmp_path.rglob("PWNED"))
    config = tomllib.loads((sweep_dir / "task-0" / "config.toml").read_text())
    assert config == {"data": "'$(touch PWNED)'\n`x`"}
    assert json.loads((sweep_dir / "sweep.json").read_text())[1] == {"data": "ok"}


def sbatch_reads(script: str, modern: bool = True) -> list:
    """The arguments sbatch takes from a script's #SBATCH lines, read as Slurm's
    src/sbatch/opt.c (_get_argument) reads them: whitespace ends an argument, a backslash
    escapes the next character, an unquoted # ends the line. Since Slurm 17.11 (`modern`) ' and
    " both quote; before, only " toggled quoting and a # ended the line even inside quotes.
    Reading stops at the first line that is neither blank nor a comment, as sbatch's does."""
    args = []
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if not line.startswith("#SBATCH"):
            continue
        i, rest = 0, line[len("#SBATCH"):]
        while True:
            while i < len(rest) and rest[i].isspace():
                i += 1
            arg, quote, escaped = "", None, False
            while i < len(rest) and (quote or not rest[i].isspace()):
                c = rest[i]
                i += 1
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                    continue
                elif c == "#" and (quote is None or not modern):
                    i = len(rest)  # a comment: the line ends here
                    break
                elif quote and c == quote:
                    quote = None
                    continue
                elif not quote and (c == '"' or (modern and c == "'")):
                    quote = c
                    continue
                arg += c
            assert quote is None, f"unmatched quote in {line!r}"
            if not arg:
                break
            args.append(arg)
    return args


def test_the_sbatch_reader_model_matches_known_slurm_behaviour():
    script = "#!/bin/bash\n#SBATCH --a=\"x y\" --b=c#d\n#SBATCH --e='f g' # note\necho\n#SBATCH --late\n"
    assert sbatch_reads(script) == ["--a=x y", "--b=c", "--e=f g"]
    assert sbatch_reads(script, modern=False) == ["--a=x y", "--b=c", "--e='f", "g'"]


DIRECTIVE_NASTY = [v for v in NASTY if "\n" not in v] + [
    "it's \"both\" #1", "a\\b\\", "#start", "'", '"', "gpu,gpu-long", "skylake&ib", "[r1|r2]*2",
    "$(touch PWNED) #", "  padded  "]


@pytest.mark.parametrize("value", DIRECTIVE_NASTY)
def test_directive_values_reach_sbatch_verbatim_and_run_nothing(value, tmp_path, stubs):
    """Values with spaces (paths, --sbatch comments) and one-word values (constraints) are
    read back by sbatch's parser, old or new, exactly as given; bash sees only comments."""
    word = value.replace(" ", "") or "x"
    script = render(["cpu", "--set", "cores_per_socket=4", "--set", f"chdir={value}",
                     "--set", f"output={value}", "--set", f"constraint={word}",
                     "--sbatch", f"comment={value}"])
    for modern in (True, False):
        read = sbatch_reads(script, modern)
        for flag, expected in (("--chdir", value), ("--output", value), ("--constraint", word),
                               ("--comment", value)):
            assert f"{flag}={expected}" in read, (modern, flag, read)
        assert len(read) == len([l for l in script.splitlines() if l.startswith("#SBATCH")])
    rc, out = run(script, tmp_path, stubs)
    assert rc == 0, out
    assert not list(tmp_path.rglob("PWNED")), out


CPU = ["cpu", "--set", "cores_per_socket=4", "--set", "max_restarts=2"]


def test_checkpointed_ranks_requeue_the_job(tmp_path, stubs):
    rc, out = run(render(CPU), tmp_path, stubs, mode="checkpointed")
    assert rc == 3, out
    assert (stubs[1] / "scontrol").read_text() == "requeue 42\n"


def test_requeues_stop_at_max_restarts(tmp_path, stubs):
    rc, out = run(render(CPU), tmp_path, stubs, mode="checkpointed", restarts=2)
    assert rc == 3 and "not requeueing" in out, out
    assert not (stubs[1] / "scontrol").exists()


def test_a_normal_end_does_not_requeue(tmp_path, stubs):
    rc, out = run(render(CPU), tmp_path, stubs, mode="ok")
    assert rc == 0 and not (stubs[1] / "scontrol").exists(), out


def _signal_when_started(proc, stubs, sig):
    deadline = time.monotonic() + 20
    while not (stubs[1] / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def test_usr1_is_forwarded_to_the_step_and_the_job_requeues(tmp_path, stubs):
    proc = start(render(CPU), tmp_path, stubs, mode="wait-usr1")
    rc, out = _signal_when_started(proc, stubs, signal.SIGUSR1)
    assert rc == 3, out
    assert (stubs[1] / "signals").read_text() == "usr1\n"
    assert (stubs[1] / "scontrol").read_text() == "requeue 42\n"


def test_term_is_forwarded_but_the_job_is_not_requeued(tmp_path, stubs):
    """scancel or preemption: checkpoint, but Slurm's decision to end the job stands."""
    proc = start(render(CPU), tmp_path, stubs, mode="wait-usr1")
    rc, out = _signal_when_started(proc, stubs, signal.SIGTERM)
    assert rc == 3 and "checkpointed after SIGTERM" in out, out
    assert (stubs[1] / "signals").read_text() == "usr1\n"  # forwarded as USR1 (see _common.sh)
    assert not (stubs[1] / "scontrol").exists()
