"""The benchmark report: results JSON -> tables. Synthetic results with known numbers."""
import json

from hpcaccel.bench import report


def throughput_result(ranks, mean, compute=0.010):
    return {"benchmark": "throughput", "ranks": ranks, "results": {"weak": {
        "hpcaccel mpi": {"samples_per_second": {"mean": mean, "ci95": [mean - 5, mean + 5]},
                         "breakdown_seconds_per_step": {"compute": compute, "comm_wait": 0.002,
                                                        "data_wait": 0.0001}}}}}


def test_load_groups_results_by_benchmark_and_rank_count(tmp_path):
    for ranks, mean in ((1, 100.0), (2, 180.0)):
        (tmp_path / f"throughput-np{ranks}.json").write_text(json.dumps(throughput_result(ranks, mean)))
    loaded = report.load(str(tmp_path))
    assert set(loaded) == {"throughput"} and set(loaded["throughput"]) == {1, 2}


def test_throughput_table_efficiency_is_throughput_over_ranks_times_one_rank():
    table = report.throughput_table({1: throughput_result(1, 100.0), 2: throughput_result(2, 180.0)},
                                    "weak")
    rows = [line for line in table.splitlines()[2:]]
    assert rows[0].startswith("| 1 | hpcaccel mpi | 100 (95-105) | 100 | 100% | 10.0 / 2.0 / 0.10 |")
    assert rows[1].startswith("| 2 | hpcaccel mpi | 180 (175-185) | 90 | 90% |")


def test_allreduce_table_has_one_row_per_size_and_one_column_per_implementation():
    rows = [{"bytes": 1 << 20, "seconds": 1e-3, "busbw": 2e9},
            {"bytes": 4096, "seconds": 2e-5, "busbw": 0.5e9}]
    data = {2: {"results": {"mpi4py Allreduce in-place": {"rows": rows}, "broken": {"error": "x"}}}}
    table = report.allreduce_table(data, 2).splitlines()
    assert table[0] == "| size | mpi4py Allreduce in-place |"
    assert table[2] == "| 4 KiB | 20.0 us, 0.50 GB/s |"
    assert table[3] == "| 1 MiB | 1,000.0 us, 2.00 GB/s |"
