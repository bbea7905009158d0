"""The set-up as a new user meets it (scripts/check_user_setup.sh): an unprivileged account,
no system MPI, no pip configuration; set-up, a short Horovod training run and the MPI tests
must pass with Horovod built and used. Root only (it creates the account and a private
mount namespace). The first run on a machine downloads torch and builds Horovod (tens of
minutes); later runs reuse the account's caches and venv (minutes). Output streams to
build/test-logs/user-setup.log."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("useradd", "runuser", "unshare")),
    reason="needs root with useradd, runuser and unshare")


def test_unprivileged_user_without_system_mpi_sets_up_trains_on_horovod_and_passes_mpi_tests():
    log = ROOT / "build" / "test-logs" / "user-setup.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        rc = subprocess.run(["bash", str(ROOT / "scripts" / "check_user_setup.sh")],
                            stdout=out, stderr=subprocess.STDOUT, timeout=3300).returncode
    text = log.read_text()
    tail = "\n".join(text.splitlines()[-60:])
    assert rc == 0, f"check_user_setup failed (rc {rc}); end of {log}:\n{tail}"
    assert "trained with backend horovod on 2 ranks" in text, tail
    assert "check_user_setup: passed" in text, tail
