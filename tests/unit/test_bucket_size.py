"""--bucket-mb auto's rule (hpcaccel/comm/bucket_size.py): pure arithmetic, no MPI."""
import math

import pytest

from hpcaccel.comm.bucket_size import LARGEST, LATENCY_SHARE, MIB, SMALLEST, choose, fit_link


def test_fit_finds_the_fixed_cost_of_a_bucket_sized_call():
    # the ring across 1 Gbit/s: 8 bytes go through the library in 50 us, but a 1 MiB call
    # pays the ring's 5 ms start on top of its transfer
    bw, start = 118e6, 5e-3
    samples = [(8, 50e-6), (1 * MIB, start + MIB / bw), (8 * MIB, start + 8 * MIB / bw)]
    a, got_bw = fit_link(samples)
    assert bw * 0.9 < got_bw < bw  # 8 MiB over its whole time, latency included: a little low
    assert start * 0.8 < a < start  # ... and the latency a little low with it
    assert choose(100 * MIB, a, got_bw) >= 8 * MIB  # buckets large enough to amortise it


def test_the_latency_is_never_below_the_smallest_call():
    # noise making 1 MiB look faster than its bytes: the 8-byte call's time is the floor
    assert fit_link([(8, 4e-6), (1 * MIB, 1e-4), (8 * MIB, 2e-3)])[0] == 4e-6


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


def test_sizes_read_in_mib_rounded():
    from hpcaccel.comm.bucket_size import describe

    assert describe(int(0.01 * 2**20), "checkpoint") == "buckets 0.01 MiB (auto: the checkpoint's)"
    assert describe(25 << 20, None) == "buckets 25 MiB (auto: one host)"
