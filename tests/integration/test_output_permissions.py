"""Every file a run writes is readable by whom the umask allows (on shared scratch,
team-mates read results), 2 ranks under real mpirun."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_outputs_follow_the_umask(tmp_path):
    out, timeline = tmp_path / "run", tmp_path / "trace.json"
    train = [sys.executable, "-m", "hpcaccel.train", "--progress", "false", "--model", "mlp",
             "--epochs", "1", "--backend", "mpi", "--out", str(out), "--timeline", str(timeline)]
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "mpirun.sh"), "2", *train],
                       capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: os.umask(0o027))
    assert r.returncode == 0, r.stderr[-3000:]
    written = [timeline] + [os.path.join(d, f) for d, _, files in os.walk(out) for f in files]
    names = {os.path.relpath(p, out) for p in written}
    assert {"metrics.jsonl", "summary.json", "model.pt"} <= names
    assert any(n.startswith("checkpoints" + os.sep) for n in names), names
    modes = {os.path.relpath(p, tmp_path): oct(os.stat(p).st_mode & 0o777) for p in written}
    assert set(modes.values()) == {oct(0o640)}, modes  # 0666 less umask 027, like open()
