"""Rendered templates as real Slurm jobs: layout (ranks per socket, per GPU), training,
sweeps and collect, and the requeue round trip on the time-limit signal."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from support import assert_same_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# small and quick: 44 steps per epoch at 2 ranks
DIGITS = ["--data", "digits", "--epochs", "1", "--backend", "mpi"]


def ranks(probe_dir) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in probe_dir.glob("rank-*.json")),
                  key=lambda r: r["rank"])


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def log_of(tmp_path) -> str:
    logs = list(tmp_path.glob("*.out"))
    return "\n".join(p.read_text() for p in logs)


def assert_completed(jobs, tmp_path):
    states = [j["JobState"] for j in jobs]
    assert states == ["COMPLETED"] * len(jobs), f"{states}\n{log_of(tmp_path)}"


def test_cpu_template_binds_one_rank_to_each_socket(cluster, site, probe, tmp_path):
    """2 sockets x 1 core, the machine's real CPUs: Slurm binds for real (task/affinity),
    so each rank's affinity is its own socket's core."""
    cluster.ensure("2x1")
    wrapper, probe_dir = probe
    script = cluster.render("cpu", "--set", "cores_per_socket=1", "--set", f"chdir={tmp_path}",
                            "--set", f"python={wrapper}", "--time", "00:10:00",
                            "--env", f"HPCACCEL_PROBE_DIR={probe_dir}", *site, "--", *DIGITS)
    jobid = cluster.sbatch(script, tmp_path / "job.sbatch")
    assert_completed(cluster.wait(jobid), tmp_path)

    got = ranks(probe_dir)
    cores = 1
    sockets = [{cpu // cores for cpu in r["cpus"]} for r in got]
    assert [len(s) for s in sockets] == [1, 1], got   # each rank inside one socket
    assert sockets[0] != sockets[1], got               # and not the same one
    assert [r["env"]["OMP_NUM_THREADS"] for r in got] == ["1", "1"]
    s = summary(tmp_path / "runs" / f"hpcaccel-{jobid}")
    assert (s["world_size"], s["backend"], s["threads_per_rank"]) == (2, "mpi", 1)


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_cpu_template_on_2x4_node_gives_each_rank_a_socket_of_threads(slurm, site, probe, tmp_path, launcher):
    """2 sockets x 4 cores declared on a 2-core machine: Slurm cannot bind to CPUs that do
    not exist (task/none), but it schedules and sizes the ranks: 2 ranks, 4 threads each,
    the allocation spanning both sockets (CPUs 0-3 and 4-7)."""
    wrapper, probe_dir = probe
    script = slurm.render(
        "cpu", "--set", "cores_per_socket=4", "--set", f"chdir={tmp_path}", "--set", f"launcher={launcher}",
        "--set", f"python={wrapper}", "--env", f"HPCACCEL_PROBE_DIR={probe_dir}",
        "--env", "OMPI_ALLOW_RUN_AS_ROOT=1", "--env", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
        *site, "--", *DIGITS)
    assert f"LAUNCHER={launcher}" in script
    jobid = slurm.sbatch(script, tmp_path / "job.sbatch")
    [job] = slurm.wait(jobid)
    detail = slurm.run("scontrol", "show", "job", "-d", jobid)
    assert_completed([job], tmp_path)
    assert job["NumTasks"] == "2" and job["CPUs/Task"] == "4", job
    assert "CPU_IDs=0-7" in detail, detail  # both sockets, all of their cores

    got = ranks(probe_dir)
    assert [r["rank"] for r in got] == [0, 1], got
    assert [r["env"]["OMP_NUM_THREADS"] for r in got] == ["4", "4"]
    s = summary(tmp_path / "runs" / f"hpcaccel-{jobid}")
    assert (s["world_size"], s["backend"], s["threads_per_rank"]) == (2, "mpi", 4)
    assert s["test_accuracy"] > 0.5


def test_gpu_template_gives_each_rank_its_own_gpu(slurm, site, probe, tmp_path):
    """The stand-in GPUs cannot compute (the trainer runs on CPU here), but Slurm's GPU
    allocation and per-rank binding are real."""
    wrapper, probe_dir = probe
    script = slurm.render("gpu", "--set", "gpus_per_node=2", "--set", "cpus_per_gpu=1",
                          "--set", f"chdir={tmp_path}", "--set", f"python={wrapper}",
                          "--env", f"HPCACCEL_PROBE_DIR={probe_dir}", *site, "--", *DIGITS)
    jobid = slurm.sbatch(script, tmp_path / "job.sbatch")
    assert_completed(slurm.wait(jobid), tmp_path)
    got = ranks(probe_dir)
    gpus = [r["env"]["CUDA_VISIBLE_DEVICES"] for r in got]
    assert sorted(gpus) == ["0", "1"], got  # one GPU each, not the same one
    assert summary(tmp_path / "runs" / f"hpcaccel-{jobid}")["world_size"] == 2


def test_sweep_runs_every_configuration_and_collect_gives_one_row_each(slurm, site, tmp_path):
    sweep = tmp_path / "lr.toml"
    sweep.write_text('[[run]]\nlr = 0.1\n\n[grid]\nlr = [0.05, 0.02]\nbatch_size = [16]\n')
    sweep_dir = tmp_path / "sweep"
    script = slurm.render("sweep", "--sweep", str(sweep), "--set", "cpus_per_rank=2",
                          "--set", f"sweep_dir={sweep_dir}", "--set", f"chdir={tmp_path}",
                          *site, "--", "--data", "digits", "--epochs", "1", "--threads", "1")
    assert "#SBATCH --array=0-2" in script
    jobid = slurm.sbatch(script, tmp_path / "job.sbatch")
    jobs = slurm.wait(jobid)
    assert len(jobs) == 3
    assert_completed(jobs, tmp_path)

    r = subprocess.run([sys.executable, "-m", "hpcaccel.slurm", "collect", str(sweep_dir), "--format", "csv"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("task,lr,batch_size,status,test_accuracy")
    assert [l.split(",")[:4] for l in lines[1:]] == [["0", "0.1", "", "done"], ["1", "0.05", "16", "done"],
                                                     ["2", "0.02", "16", "done"]]
    for i, lr in enumerate([0.1, 0.05, 0.02]):
        assert summary(sweep_dir / f"task-{i}")["config"]["lr"] == lr
    md = subprocess.run([sys.executable, "-m", "hpcaccel.slurm", "collect", str(sweep_dir)],
                        capture_output=True, text=True, cwd=ROOT).stdout
    assert len([l for l in md.splitlines() if l.startswith("| ") and "done" in l]) == 3


# long enough to be signalled mid-run: 10 epochs of 512 steps, about 1 s each here
LONG = ["--data", "synthetic", "--synthetic-samples", "16384", "--synthetic-shape", "64",
        "--model", "mlp", "--epochs", "10", "--batch-size", "16", "--backend", "mpi", "--threads", "1"]


def _requeue_supported():
    from hpcaccel.config import TrainConfig
    return "resume" in TrainConfig.__dataclass_fields__


needs_resume = pytest.mark.skipif(not _requeue_supported(), reason="needs checkpoint/resume")


def _long_job(slurm, site, tmp_path, name, launcher="srun"):
    run_dir = tmp_path / name
    script = slurm.render("cpu", "--set", "cores_per_socket=4", "--set", f"chdir={tmp_path}",
                          "--job-name", name, "--set", f"run_dir={run_dir}", "--time", "00:10:00",
                          "--set", "signal_seconds=60", "--set", f"launcher={launcher}",
                          "--env", "OMPI_ALLOW_RUN_AS_ROOT=1", "--env", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
                          *site, "--", *LONG)
    return slurm.sbatch(script, tmp_path / f"{name}.sbatch"), run_dir


@pytest.fixture(scope="module")
def reference(cluster, site, tmp_path_factory):
    """The uninterrupted run's model, from the same template and flags."""
    cluster.ensure()
    tmp_path = tmp_path_factory.mktemp("reference")
    jobid, run_dir = _long_job(cluster, site, tmp_path, "reference")
    assert_completed(cluster.wait(jobid), tmp_path)
    return torch.load(run_dir / "model.pt", weights_only=True)


@needs_resume
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_result(slurm, site, tmp_path, launcher,
                                                                          reference):
    jobid, run_dir = _long_job(slurm, site, tmp_path, "requeued", launcher)
    log = tmp_path / f"requeued-{jobid}.out"
    slurm.wait_for_line(log, "epoch 1/10", jobid)
    # what Slurm does at time limit - signal_seconds (--signal=B:USR1@60), delivered now
    slurm.run("scancel", "--batch", "--signal=USR1", jobid)
    [job] = slurm.wait(jobid)
    text = log.read_text()
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), text
    assert "batch shell got SIGUSR1" in text and "requeueing job" in text, text
    assert "stopped by SIGUSR1" in text and "resuming from" in text, text
    assert "restart 1 on" in text, text

    assert_same_model(run_dir / "model.pt", reference)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 10
    assert summary(run_dir)["resumed_from"]


@needs_resume
def test_scancel_checkpoints_but_does_not_requeue(slurm, site, tmp_path):
    jobid, run_dir = _long_job(slurm, site, tmp_path, "cancelled")
    log = tmp_path / f"cancelled-{jobid}.out"
    slurm.wait_for_line(log, "epoch 1/10", jobid)
    slurm.run("scancel", jobid)
    [job] = slurm.wait(jobid)
    text = log.read_text()
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), text
    assert "checkpointed after SIGTERM" in text and "requeueing" not in text, text
    assert list((run_dir / "checkpoints").glob("step-*.pt")), text
    assert not (run_dir / "summary.json").exists()


def test_sbatch_reads_every_directive_value_as_given(cluster, tmp_path):
    """Slurm's own syntax and values with spaces, quotes, # and backslashes, as sbatch itself
    reads them from the rendered #SBATCH lines: `sbatch -v --test-only` lists the options it
    took before it would contact a controller, and a throwaway slurm.conf names one that does
    not run, so nothing is submitted (the cluster fixture only guarantees Slurm is installed)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=parse\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=1\n"
                    "AuthType=auth/none\nNodeName=n1 CPUs=1 State=UNKNOWN\n"
                    "PartitionName=p Nodes=ALL Default=YES\n")
    comment = "it's \"quoted\" #1 \\ $(not run) [a|b]&c"
    script = cluster.render("cpu", "--partition", "gpu,gpu-long", "--set", "constraint=[rack1|rack2]&ib",
                            "--set", "cores_per_socket=8", "--set", "output=my logs/%x #%j.out",
                            "--sbatch", f"comment={comment}")
    (tmp_path / "job.sbatch").write_text(script)
    r = subprocess.run(["sbatch", "-v", "--test-only", "job.sbatch"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, env={**cluster.env, "SLURM_CONF": str(conf)})
    options = dict(re.findall(r"^sbatch: (\S+) +: (.*)$", r.stderr, re.M))
    assert options.get("comment") == comment, r.stderr
    assert (options["partition"], options["constraint"]) == ("gpu,gpu-long", "[rack1|rack2]&ib")
    assert options["output"] == f"{tmp_path}/my logs/%x #%j.out"
    assert options["cpus-per-task"] == "8" and options["signal"] == "B:USR1@300"


def test_own_script_checkpoints_on_usr1_requeues_and_resumes(slurm, site, tmp_path):
    """--script: an hpcaccel.torch script with a Job (examples/hpcaccel_torch_script.py)
    run by the cpu template: the time-limit signal makes it checkpoint and exit with code 3,
    the job requeues itself, and the script started again resumes in the same run
    directory (HPCACCEL_RUN_DIR) and finishes."""
    example = os.path.join(ROOT, "examples", "hpcaccel_torch_script.py")
    script = slurm.render("cpu", "--set", "cores_per_socket=1", "--set", f"chdir={tmp_path}",
                          "--job-name", "own", "--time", "00:10:00", "--set", "signal_seconds=60",
                          "--script", example, *site,
                          "--", "--epochs", "6", "--batch-size", "8", "--lr", "0.02")
    jobid = slurm.sbatch(script, tmp_path / "own.sbatch")
    log = tmp_path / f"own-{jobid}.out"
    slurm.wait_for_line(log, "epoch 1/6", jobid)
    slurm.run("scancel", "--batch", "--signal=USR1", jobid)
    [job] = slurm.wait(jobid, timeout=300)
    text = log.read_text()
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), text
    assert "stopped by SIGUSR1" in text and "requeueing job" in text, text
    assert "resuming from" in text and "epoch 6/6" in text, text
    run_dir = tmp_path / "runs" / f"own-{jobid}"
    assert (run_dir / "model.pt").exists() and (run_dir / "run.json").exists(), text
