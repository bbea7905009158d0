"""Rendering Slurm templates: golden files, validation, one-line errors naming the flag.

Golden files: tests/unit/golden/*.sbatch; after an intended change to a template,
regenerate them with  HPCACCEL_UPDATE_GOLDEN=1 pytest tests/unit/test_slurm_render.py
and review the diff.
"""
import os
import subprocess

import pytest

from hpcaccel import slurm
from hpcaccel.slurm import template as slurm_template
from hpcaccel.errors import REQUEUE_EXIT_CODE, UsageError

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWEEP = os.path.join(GOLDEN, "sweep-lr.toml")

CASES = {
    "cpu-minimal": ["render", "cpu", "--set", "cores_per_socket=32"],
    "cpu-site-mpirun": [
        "render", "cpu", "--nodes", "4", "--time", "1-00:00:00", "--partition", "compute",
        "--account", "proj42", "--job-name", "resnet.v2", "--set", "cores_per_socket=32",
        "--set", "modules=gcc/12.2 openmpi/4.1.4", "--set", "venv=/opt/venvs/hpcaccel",
        "--set", "launcher=mpirun", "--set", "run_dir=/scratch/me/resnet", "--set", "signal_seconds=600",
        "--env", "OMPI_MCA_btl=self,vader,tcp", "--sbatch", "exclusive", "--sbatch=--mail-type=END",
        "--", "--data", "/scratch/ds/index.json", "--epochs", "90"],
    "gpu": ["render", "gpu", "--nodes", "2", "--set", "gpus_per_node=4", "--set", "cpus_per_gpu=8",
            "--set", "conda_env=torch", "--set", "setup_script=/etc/site/gpu-env.sh",
            "--", "--data", "/scratch/ds/index.json"],
    "cpu-slurm-syntax": [
        "render", "cpu", "--partition", "gpu,gpu-long", "--set", "constraint=[rack1|rack2]&ib",
        "--set", "cores_per_socket=8", "--set", "output=logs/my run %j.out",
        "--sbatch", "comment=it's \"quoted\" #1 \\ $(not run)"],
    # your own script (a path from the checkout's root) with its own arguments after --
    "cpu-script": ["render", "cpu", "--set", "cores_per_socket=8", "--script",
                   "examples/horovod_script.py", "--set", "script_runner=horovod", "--",
                   "--epochs", "5", "--fp16-allreduce"],
    # a lost node does not end the job: relaunch on the nodes left (srun, and mpirun);
    # global batch 4 x 2 x 24 = 192, kept on 8, 6 and 4 ranks
    "cpu-elastic": ["render", "cpu", "--elastic", "--nodes", "4", "--min-nodes", "2",
                    "--max-restarts", "3", "--set", "cores_per_socket=32", "--",
                    "--data", "/scratch/ds/index.json", "--epochs", "90", "--batch-size", "24"],
    "cpu-elastic-mpirun": ["render", "cpu", "--elastic", "--nodes", "2", "--set",
                           "cores_per_socket=16", "--set", "launcher=mpirun", "--set",
                           "checkpoint_seconds=120", "--set", "probe_seconds=5", "--",
                           "--data", "digits"],
    "sweep": ["render", "sweep", "--sweep", SWEEP, "--set", "max_parallel=2", "--set", "cpus_per_rank=8",
              "--time", "00:30:00", "--", "--data", "digits", "--epochs", "5"],
}


def render(capsys, argv):
    rc = slurm.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # where a relative --script is found
    rc, out, err = render(capsys, CASES[case])
    assert rc == 0, err
    path = os.path.join(GOLDEN, f"{case}.sbatch")
    if os.environ.get("HPCACCEL_UPDATE_GOLDEN") == "1":
        with open(path, "w") as fh:
            fh.write(out)
    with open(path) as fh:
        assert out == fh.read(), f"{case}: differs from {path} (see the module docstring)"
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)  # valid bash


def test_directives_come_first_and_sorted(capsys):
    _, out, _ = render(capsys, CASES["cpu-site-mpirun"])
    lines = out.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [l for l in lines if l.startswith("#SBATCH")]
    assert lines[1:1 + len(directives)] == directives == sorted(directives)
    assert "#SBATCH --signal=B:USR1@600" in directives and "#SBATCH --requeue" in directives
    assert not [l for l in lines if l.startswith("#@") or "{{" in l]


def test_optional_directives_are_dropped_when_empty(capsys):
    _, out, _ = render(capsys, CASES["cpu-minimal"])
    for flag in ("--partition", "--account", "--qos", "--mem", "--constraint", "--chdir"):
        assert f"#SBATCH {flag}" not in out


def test_sweep_array_and_embedded_configs(capsys):
    _, out, _ = render(capsys, CASES["sweep"])
    assert "#SBATCH --array=0-4%2" in out
    assert "#SBATCH --output=%x-%A_%a.out" in out  # the sweep's own default


def test_requeue_exit_code_is_the_trainers():
    assert REQUEUE_EXIT_CODE == 3
    tpl = slurm.load_template("cpu")
    out = slurm_template.render(tpl, {"cores_per_socket": ("4", "--set cores_per_socket")})
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}\n" in out


@pytest.mark.parametrize("argv,needle", [
    (["render", "cpu"], "--set cores_per_socket=VALUE is required by template cpu"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--nodes", "0"], "--nodes: nodes must be a positive integer"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--nodes", "two"], "--nodes: nodes must be a positive integer"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--time", "25:61:00"], "--time: time must be a time limit"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--time", "0"], "--time: time must be a time limit"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--time", "00:04:00"], "--time: the time limit (00:04:00 = 240 s) must be longer"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--time", "00:04:00", "--set", "signal_seconds=300"],
     "--set signal_seconds: signal_seconds (300) must be less than"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--job-name", "a b"], "--job-name: job_name may contain only"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--partition", "a b"], "--partition: partition must be one word"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--job-name", "myhetjob"],
     "--job-name: 'myhetjob' contains 'hetjob', which sbatch reads as a job separator"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--set", "launcher=ssh"], "--set launcher: launcher must be one of srun, mpirun"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--set", "colour=blue"], "--set colour: template cpu has no parameter 'colour'"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--set", "array=0-3"], "--set array: array is computed"),
    (["render", "cpu", "--set", "cores_per_socket"], "--set cores_per_socket: expected KEY=VALUE"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--set", "nodes=1", "--nodes", "2"], "--set nodes: given twice"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--", "--out", "x"], "--out (after --): the template sets it"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--", "--resume=auto"], "--resume (after --)"),
    # abbreviations are refused, so none can override the template's --out and --resume
    (["render", "cpu", "--set", "cores_per_socket=4", "--", "--ou", "x"], "train flags (after --): unrecognized arguments: --ou x"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--", "--resum", "none"], "unrecognized arguments: --resum none"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--node", "2"], "unrecognized arguments: --node 2"),
    (["render", "sweep", "--sweep", SWEEP, "--", "--lr=0.3"], "--lr (after --): the sweep file sets lr per task"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--", "--epochs", "-1"], "train flags (after --): --epochs must be positive"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--", "--no-such-flag"], "train flags (after --): unrecognized arguments"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--env", "1X=2"], "--env 1X=...: not a valid environment variable name"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--sbatch", "requeue"], "--sbatch --requeue: already set by template cpu"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--sbatch", "comment=a\nb"],
     "--sbatch --comment: 'a\\nb' must be one line without control characters"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--sbatch", "x;rm=1"], "not an sbatch option name"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--set", "constraint=a b"], "--set constraint: constraint must be one word"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--set", "output=a\rb"], "--set output: 'a\\rb' must be one line"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--sweep", SWEEP], "--sweep: template cpu does not run sweeps"),
    (["render", "sweep"], "--sweep FILE is required by template sweep"),
    (["render", "sweep", "--sweep", SWEEP, "--", "--lr", "0.3"], "--lr (after --): the sweep file sets lr per task"),
    (["render", "nosuch"], "template nosuch: no such template (known: cpu, gpu, sweep)"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--script", "/nonexistent/train.py"],
     "--script: /nonexistent/train.py: no such file"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--set", "chdir=/nonexistent", "--script",
      "train.py"], "--script: train.py: no such file in --set chdir /nonexistent"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--script", __file__, "--set",
      "script_runner=bash"], "--set script_runner: script_runner must be one of python, horovod"),
    (["render", "sweep", "--sweep", SWEEP, "--script", __file__],
     "--script: template sweep has no parameter 'script'"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--elastic", "--nodes", "2", "--min-nodes", "3"],
     "--min-nodes: min_nodes (3) must not be more than nodes (2)"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--elastic", "--min-nodes", "0"],
     "--min-nodes: min_nodes must be a positive integer"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--elastic", "--script", __file__],
     "--elastic: relaunches hpcaccel.train"),
    (["render", "sweep", "--sweep", SWEEP, "--elastic"], "--elastic: template sweep has no parameter 'elastic'"),
    (["render", "cpu", "--set", "cores_per_socket=4", "--set", "elastic=yes"],
     "--set elastic: elastic must be one of true, false"),
    # the global batch 4 x 2 x 32 = 256 cannot be kept on the 6 ranks of 3 nodes
    (["render", "cpu", "--elastic", "--nodes", "4", "--min-nodes", "2", "--set", "cores_per_socket=32",
      "--", "--batch-size", "32"],
     "--min-nodes: the global batch 256 (4 nodes x 2 ranks x --batch-size 32) cannot be split evenly "
     "over 6 ranks (3 nodes), which the job goes on with after losing nodes (down to --min-nodes 2); "
     "it splits evenly over 8 or 4 ranks (4 or 2 nodes): use --batch-size 30 or 33 (global batch 240 or 264)"),
    (["render", "cpu", "--elastic", "--nodes", "5", "--set", "cores_per_socket=32"],  # --batch-size 16
     "--elastic: the global batch 160 (5 nodes x 2 ranks x --batch-size 16) cannot be split evenly over "
     "6 ranks (3 nodes), which the job goes on with after losing nodes (down to --min-nodes 1); it splits "
     "evenly over 10, 8, 4 or 2 ranks (5, 4, 2 or 1 nodes): use --min-nodes 4 or --batch-size 12 or 24"),
    # gpu: a rank per GPU (4 per node); a --config file's batch size counts as the flag's
    (["render", "gpu", "--elastic", "--nodes", "3", "--set", "gpus_per_node=4", "--set", "min_nodes=2",
      "--", "--config", os.path.join(GOLDEN, "batch-3.toml")],
     "--set min_nodes: the global batch 36 (3 nodes x 4 ranks x --batch-size 3) cannot be split evenly "
     "over 8 ranks (2 nodes)"),
    (["render", "cpu", "--elastic", "--set", "cores_per_socket=4"],
     "--elastic: needs --nodes 2 or more: with 1 node there is none to lose"),
    (["render", "cpu", "--min-nodes", "2", "--nodes", "4", "--set", "cores_per_socket=4"],
     "--min-nodes: min_nodes is used only with --elastic: add --elastic or drop --min-nodes"),
    (["render", "gpu", "--set", "gpus_per_node=4", "--set", "probe_seconds=5"],
     "--set probe_seconds: probe_seconds is used only with --elastic"),
    (["collect", "/nonexistent/sweep"], "collect /nonexistent/sweep: no such directory"),
    (["collect", "x", "--", "--lr", "1"], "collect: takes no train flags"),
])
def test_bad_input_is_one_line_naming_the_flag(argv, needle, capsys):
    rc, out, err = render(capsys, argv)
    assert rc == UsageError.exit_code == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("hpcaccel.slurm: error: "), err
    assert needle in err, err


def test_a_script_runs_instead_of_train_with_the_arguments_after_dashes(capsys):
    """--script: the arguments after -- are the script's own (not checked as train flags,
    --out included), and its output directory comes from the template (HPCACCEL_RUN_DIR)."""
    rc, out, err = render(capsys, ["render", "gpu", "--set", "gpus_per_node=2", "--script",
                                   __file__, "--", "--out", "x", "--my-flag"])
    assert rc == 0, err
    assert f"SCRIPT={__file__}\n" in out and "export HPCACCEL_RUN_DIR=$RUN_DIR" in out
    assert 'hpcaccel_run "${launch[@]}" "${program[@]}" --out x --my-flag\n' in out
    assert "case python in" in out
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)


@pytest.mark.parametrize("key,value", [("out", '"/elsewhere"'), ("resume", '"none"')])
def test_a_config_file_after_dashes_cannot_set_what_the_template_owns(tmp_path, capsys, key, value):
    config = tmp_path / "run.toml"
    config.write_text(f"epochs = 2\n{key} = {value}\n")
    rc, out, err = render(capsys, ["render", "cpu", "--set", "cores_per_socket=4", "--", "--config", str(config)])
    assert rc == 2 and out == ""
    assert err.startswith(f"hpcaccel.slurm: error: --{key} (after --, in --config {config}): "), err


@pytest.mark.parametrize("value", ["x\n#SBATCH --uid=0", "x\r#SBATCH --uid=0", "a\tb", "a\0b"])
def test_directive_values_cannot_smuggle_lines(value, capsys):
    for flag in (["--job-name", value], ["--partition", value], ["--set", f"output={value}"],
                 ["--set", f"chdir={value}"], ["--set", f"constraint={value}"],
                 ["--sbatch", f"comment={value}"]):
        rc, out, err = render(capsys, ["render", "cpu", "--set", "cores_per_socket=4", *flag])
        assert rc == 2 and out == "" and len(err.splitlines()) == 1, (flag, err)


def test_slurm_syntax_goes_into_directives_as_written(capsys):
    """Partition lists and constraint expressions are Slurm's own syntax; nothing in them is
    special to sbatch's reader of #SBATCH lines, so they are written unquoted."""
    for argv, line in [(["--partition", "gpu,gpu-long"], "#SBATCH --partition=gpu,gpu-long"),
                       (["--set", "constraint=skylake&ib"], "#SBATCH --constraint=skylake&ib"),
                       (["--set", "constraint=[rack1|rack2]"], "#SBATCH --constraint=[rack1|rack2]"),
                       (["--sbatch", "constraint=skylake&ib"], "#SBATCH --constraint=skylake&ib"),
                       (["--sbatch", "nodelist=n[01-04]"], "#SBATCH --nodelist=n[01-04]"),
                       (["--set", "output=logs/my run %j.out"], '#SBATCH --output="logs/my run %j.out"')]:
        rc, out, err = render(capsys, ["render", "cpu", "--set", "cores_per_socket=4", *argv])
        assert rc == 0 and line in out.splitlines(), (argv, err)


@pytest.mark.parametrize("text,problem", [
    ("#!/bin/bash\necho {{nope}}\n", "unknown placeholder {{nope}}"),
    ("#!/bin/bash\n#@param x posint\n", "expected #@param NAME TYPE DEFAULT HELP"),
    ("#!/bin/bash\n#@param x float 1 help\n", "unknown parameter type 'float'"),
    ("#!/bin/bash\n#@default y 1\n", "#@default of undeclared parameter 'y'"),
    ("#!/bin/bash\n#@sbatch nodes=1\n", "expected #@sbatch --FLAG[=VALUE]"),
    ("#!/bin/bash\n#@frobnicate\n", "unknown line #@frobnicate"),
])
def test_template_mistakes_are_reported(text, problem):
    with pytest.raises(UsageError, match=problem.replace("{", r"\{").replace("}", r"\}").replace("[", r"\[").replace("]", r"\]")):
        slurm_template.parse("t", text)


def test_templates_and_params_are_listed(capsys):
    assert slurm.main(["templates"]) == 0
    assert capsys.readouterr().out.split() == ["cpu", "gpu", "sweep"]
    assert slurm.main(["params", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cores_per_socket" in out and "(required)" in out and "signal_seconds" in out


@pytest.mark.parametrize("text,seconds", [("01:00:00", 3600), ("1-00:00:00", 86400), ("2-12", 216000),
                                          ("90", 5400), ("10:30", 630), ("48:00:00", 172800)])
def test_time_limits(text, seconds):
    assert slurm_template._time_seconds(text) == seconds


@pytest.mark.parametrize("text", ["0", "00:00:00", "1:60:00", "1-25:00:00", "abc", "01:00:00\n", "-1", ""])
def test_bad_time_limits(text):
    assert slurm_template._time_seconds(text) is None


def test_elastic_runs_the_relaunch_loop_and_keeps_the_requeue(capsys):
    _, out, _ = render(capsys, CASES["cpu-elastic"])
    assert "#SBATCH --no-kill" in out and "#SBATCH --requeue" in out
    assert "#SBATCH --signal=B:USR1@300" in out  # a time limit still ends in a requeue
    assert "MIN_NODES=2\n" in out and "MAX_RESTARTS=3\n" in out
    assert "program+=(--checkpoint-every-seconds 300)" in out
    assert out.rstrip().endswith("hpcaccel_run_elastic \"${program[@]}\" --data /scratch/ds/index.json "
                                 "--epochs 90 --batch-size 24")
    _, plain, _ = render(capsys, CASES["cpu-minimal"])
    for needle in ("--no-kill", "hpcaccel_run_elastic", "MIN_NODES", "checkpoint-every-seconds"):
        assert needle not in plain


def _parse(text, include=None):
    return slurm_template.parse("t", text, include)


@pytest.mark.parametrize("text,needle", [
    ("#@param a true|false false x\n#@else\n", "#@else without #@if"),
    ("#@param a true|false false x\n#@endif\n", "#@endif without #@if"),
    ("#@param a true|false false x\n#@if a\necho\n", "#@if a without #@endif"),
    ("#@if nope\necho\n#@endif\n", "#@if of undeclared parameter 'nope'"),
    ("#@if a b\n#@endif\n", "expected #@if NAME"),
])
def test_conditional_blocks_are_checked(text, needle):
    with pytest.raises(UsageError, match=needle):
        _parse(text)


def test_conditional_blocks_keep_lines_and_directives_by_a_parameter():
    tpl = _parse("#!/bin/bash\n#@param a true|false false x\n#@param b true|false true y\n"
                 "#@if a\n#@sbatch --no-kill\none\n#@if b\nboth\n#@endif\n#@else\nnot-a\n"
                 "#@endif\nalways\n")
    def body(**values):
        out = slurm_template.render(tpl, {k: (v, f"--set {k}") for k, v in values.items()})
        return [l for l in out.splitlines()[1:] if l]
    assert body() == ["not-a", "always"]
    assert body(a="true") == ["#SBATCH --no-kill", "one", "both", "always"]
    assert body(a="true", b="false") == ["#SBATCH --no-kill", "one", "always"]
