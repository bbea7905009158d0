"""The ring-allreduce cost model: formula, fit and predictions."""
import pytest

from hpcaccel.bench.costmodel import PRESETS, efficiency, fit, predict_table, ring_time, step_time


def test_ring_time_formula():
    a, b, g = 1e-6, 1e-9, 1e-10
    assert ring_time(1, 1e6, a, b, g) == 0
    assert ring_time(2, 1e6, a, b, g) == pytest.approx(2 * a + 1e6 * b + 0.5e6 * g)
    assert ring_time(4, 1e6, a, b, g) == pytest.approx(6 * a + 1.5e6 * b + 0.75e6 * g)
    # bandwidth term saturates at 2n·beta: ring allreduce scales to many ranks
    assert ring_time(1024, 1e8, 0, b, 0) == pytest.approx(2 * 1e8 * b, rel=1e-2)


def test_fit_recovers_parameters_from_synthetic_measurements():
    a, b, g = 3e-6, 1.5e-10, 5e-11
    samples = [(p, n, ring_time(p, n, a, b, g)) for p in (2, 4) for n in (4, 4096, 2**20, 2**26)]
    fa, fb = fit(samples, gamma=g)
    assert fa == pytest.approx(a, rel=1e-6) and fb == pytest.approx(b, rel=1e-6)


def test_fit_needs_data():
    with pytest.raises(ValueError):
        fit([(1, 10, 1.0)], 0.0)


def test_overlap_and_efficiency():
    net = PRESETS["ib100"]
    c, n = 0.1, 100e6
    comm = ring_time(8, n, net.alpha, net.beta, 0)
    assert step_time(c, n, 8, net.alpha, net.beta, 0, overlap=0) == pytest.approx(c + comm)
    assert step_time(c, n, 8, net.alpha, net.beta, 0, overlap=1) == pytest.approx(max(c, comm))
    rows = predict_table(c, n, net.alpha, net.beta, 0)
    effs = [r["efficiency"] for r in rows]
    assert all(x >= y for x, y in zip(effs, effs[1:]))  # never improves with more ranks
    assert efficiency(c, n, 2, net.alpha, net.beta, 0) == pytest.approx(effs[0])


def test_two_level_model_one_host_is_the_intra_ring_and_one_rank_per_host_the_inter_ring():
    from hpcaccel.bench.costmodel import Network, allreduce_time
    intra, inter, g = Network("shm", 2e-6, 1e-10), Network("1g", 50e-6, 8e-9), 1e-10
    n = 2**24
    assert allreduce_time("ring", 1, 4, n, intra, inter, g) == pytest.approx(ring_time(4, n, 2e-6, 1e-10, g))
    assert allreduce_time("ring", 2, 1, n, intra, inter, g) == pytest.approx(ring_time(2, n, 50e-6, 8e-9, g))
    # with one rank per host the node-aware sum is the ring across hosts
    assert allreduce_time("hierarchical", 2, 1, n, intra, inter, g) == pytest.approx(
        allreduce_time("ring", 2, 1, n, intra, inter, g))


def test_node_aware_sends_each_hosts_gradient_once():
    """2 hosts x 2 ranks on a slow network: the flat ring moves 1.5 n through a host's link,
    the node-aware sum n (the 1.5 x of docs/benchmarks.md), plus a little within the host."""
    from hpcaccel.bench.costmodel import Network, allreduce_time
    intra, inter = Network("shm", 0.0, 1e-10), Network("1g", 0.0, 8e-9)
    n = 2**26
    flat = allreduce_time("ring", 2, 2, n, intra, inter, 0.0)
    node_aware = allreduce_time("hierarchical", 2, 2, n, intra, inter, 0.0)
    assert flat == pytest.approx(1.5 * n * 8e-9)
    assert node_aware == pytest.approx(n * 8e-9 + n * 1e-10)
    assert flat / node_aware == pytest.approx(1.5, rel=0.02)


def test_predict_per_level_on_the_command_line(capsys, tmp_path, monkeypatch):
    """`bench predict --nodes 2 --ranks-per-node 2 --inter-gbit 1`: both algorithms, the
    node-aware one faster across a slow link."""
    from hpcaccel.bench.__main__ import run
    monkeypatch.chdir(tmp_path)  # no benchmarks/results here: presets and flags only
    assert run(["predict", "--grad-mb", "64", "--compute-ms", "100", "--nodes", "2",
                "--ranks-per-node", "2", "--inter-gbit", "1"]) == 0
    out = capsys.readouterr().out
    ring = float(out.split("ring: step ")[1].split(" ms")[0])
    node_aware = float(out.split("hierarchical: step ")[1].split(" ms")[0])
    assert node_aware < ring
    # 64 MiB at 1 Gbit/s through each host's link once: ~537 ms plus compute
    assert 100 + 500 < node_aware < 100 + 700


def test_predict_per_level_uses_the_chosen_network(capsys, tmp_path, monkeypatch):
    """--network ib100 with --nodes: the per-level table crosses hosts over InfiniBand too, so
    its flat ring over 4 x 2 ranks is the preset table's 8-rank row."""
    from hpcaccel.bench.__main__ import main
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--grad-mb", "96", "--compute-ms", "140", "--network", "ib100",
                 "--nodes", "4", "--ranks-per-node", "2"]) == 0
    out = capsys.readouterr().out
    assert f"across hosts ({PRESETS['ib100'].name})" in out and "Gbit/s" not in out
    flat = float(out.split("| 8 | ")[1].split(" |")[0])
    level_row = next(l for l in out.splitlines() if l.startswith("| 96 MiB |"))
    ring = float(level_row.split(" | ")[1])
    assert ring == pytest.approx(flat, abs=0.1)
    assert ring < 100  # not 1 Gbit/s (about 1.4 s)
    assert main(["predict", "--grad-mb", "96", "--compute-ms", "140", "--network", "ib100",
                 "--nodes", "4", "--inter-gbit", "10"]) == 2
    assert "--inter-gbit: --network ib100 already sets the link across hosts" in capsys.readouterr().err
