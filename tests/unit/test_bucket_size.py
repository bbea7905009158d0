"""--bucket-mb auto's rule (hpcaccel/comm/bucket_size.py): pure arithmetic, no MPI."""
import math

import pytest

from hpcaccel.comm.bucket_size import LARGEST, LATENCY_SHARE, MIB, SMALLEST, choose, fit_link


def test_fit_recovers_latency_and_bandwidth():
    a, bw = 200e-6, 118e6  # 1 Gbit/s Ethernet seen through TCP
    samples = [(n, a + n / bw) for n in (8 * MIB, 8)]
    got_a, got_bw = fit_link(samples)
    assert got_a == pytest.approx(a, rel=1e-3) and got_bw == pytest.approx(bw, rel=1e-3)


def test_a_large_size_no_slower_than_twice_the_latency_counts_whole():
    # noise (a slow small call): the bandwidth is never inflated by subtracting most of t2
    assert fit_link([(8, 0.004), (8 * MIB, 0.006)]) == (0.004, 8 * MIB / 0.006)


@pytest.mark.parametrize("grad_mb,latency_s,bandwidth", [
    (100, 30e-6, 5e9),     # 25M-parameter model, shared memory
    (100, 500e-6, 118e6),  # the same over 1 Gbit/s
    (1, 30e-6, 5e9),       # a tiny model
    (4000, 5e-3, 118e6),   # a billion parameters over a slow, high-latency link
])
def test_size_is_a_power_of_two_within_bounds_and_keeps_latency_small(grad_mb, latency_s, bandwidth):
    size = choose(grad_mb * MIB, latency_s, bandwidth)
    assert SMALLEST <= size <= LARGEST and math.log2(size / MIB).is_integer()
    if size < LARGEST:  # within a factor sqrt(2) of the floor that keeps latency <= 5%
        per_bucket = latency_s + size / bandwidth
        assert latency_s / per_bucket <= LATENCY_SHARE * math.sqrt(2) + 1e-9


def test_size_balances_latency_against_the_exposed_last_bucket():
    # G*a/b + b/bw is smallest at b = sqrt(G*a*bw): 100 MiB at 0.1 ms and 1 GB/s -> ~3 MiB
    # (above the 5%-latency floor of 1.8 MiB)
    grad, a, bw = 100 * MIB, 1e-4, 1e9
    assert choose(grad, a, bw) == 2 ** round(math.log2(math.sqrt(grad * a * bw) / MIB)) * MIB
    # a larger gradient or a slower start-up per message: never smaller buckets
    assert choose(4 * grad, a, bw) >= choose(grad, a, bw)
    assert choose(grad, 4 * a, bw) >= choose(grad, a, bw)


def test_noise_within_a_factor_of_1_2_rarely_moves_the_choice():
    base = choose(100 * MIB, 500e-6, 118e6)
    moved = sum(choose(100 * MIB, 500e-6 * f, 118e6) != base for f in (0.9, 0.95, 1.05, 1.1))
    assert moved <= 1
