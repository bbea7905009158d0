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
