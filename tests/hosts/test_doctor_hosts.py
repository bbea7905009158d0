"""The preflight doctor across emulated hosts: a shared --out passes and the probe measures
across hosts; an --out that one host does not share (a private mount there) is named."""
from __future__ import annotations

import sys


def doctor_on_hosts(hosts, out, private_on: str | None):
    # each host runs its ranks in its own mount namespace: a tmpfs mounted by host
    # `private_on` over --out hides the shared directory there only
    mount = (f'if [ "$(hostname)" = {private_on} ]; then mount -t tmpfs none {out}; fi; '
             if private_on else "")
    return hosts.run(1, "sh", "-c", f"{mount}exec {sys.executable} -m hpcaccel.doctor --out {out}",
                     limit=120)


def test_shared_out_passes_and_probe_spans_hosts(hosts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = doctor_on_hosts(hosts, out, None)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert f"{hosts.count} rank(s) on {hosts.count} host(s)" in r.stdout
    assert all(name in r.stdout for name in hosts.names)
    assert "rank 0 writes there and every host sees it" in r.stdout
    assert f"across hosts, one rank per host ({hosts.count} ranks): latency" in r.stdout
    assert list(out.iterdir()) == []


def test_out_one_host_does_not_share_is_named(hosts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = doctor_on_hosts(hosts, out, hosts.names[-1])
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    [problem] = [line for line in r.stdout.splitlines() if line.startswith("PROBLEM:")]
    assert f"host(s) {hosts.names[-1]} do not see rank 0's file" in problem
    assert hosts.names[0] not in problem
    assert list(out.iterdir()) == []
