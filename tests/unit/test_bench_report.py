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


def test_across_hosts_results_merge_per_layout_and_plot(tmp_path):
    def hosts_result(tag, names):
        rows = {str(n): {"seconds": 0.01, "best_seconds": 0.009, "busbw_gbit": 0.9} for n in (1 << 20, 4 << 20)}
        return {"benchmark": f"hosts-allreduce-2x2-{tag}", "ranks": 4, "hosts": 2, "ranks_per_host": 2,
                "link_gbit": 1.0, "results": {n: rows for n in names}}
    for tag, names in (("all", ["hpcaccel ring", "torch.distributed gloo"]),
                       ("horovod", ["horovod flat"]), ("horovod-hier", ["horovod hierarchical"])):
        (tmp_path / f"hosts-allreduce-2x2-{tag}-np4.json").write_text(json.dumps(hosts_result(tag, names)))
    merged = report.hosts_allreduce(report.load(str(tmp_path)))
    assert set(merged) == {"2x2"} and set(merged["2x2"]["results"]) == {
        "hpcaccel ring", "torch.distributed gloo", "horovod flat", "horovod hierarchical"}
    assert set(merged["2x2"]["results"]["horovod flat"]) == {1 << 20, 4 << 20}  # sizes as ints
    written = report.hosts_plots(report.load(str(tmp_path)), str(tmp_path / "img"))
    assert [p.rsplit("/", 1)[1] for p in written] == ["hosts-allreduce-2x2.png"]
    assert (tmp_path / "img" / "hosts-allreduce-2x2.png").stat().st_size > 1000


def test_torch_api_tables_show_each_variant_with_spread_and_the_paired_ratios():
    def s(values):
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                "values": values}
    train = {"benchmark": "torch-api-train-mlp25m-1x2", "ranks": 2, "model": "mlp25m",
             "layout": "1x2", "same_final_parameters": True,
             "results": {"hpcaccel.torch": {"samples_per_second": s([130.0, 150.0])},
                         "Horovod": {"samples_per_second": s([100.0, 100.0])}},
             "ratios": {"hpcaccel.torch / Horovod": s([1.3, 1.5])}}
    calls = {"benchmark": "torch-api-allreduce-1x2", "ranks": 2, "layout": "1x2",
             "results": {"mpi4py Allreduce": {"4": s([2e-6])},
                         "hpcaccel.torch": {"4": s([50e-6, 70e-6])}},
             "check_seconds_per_call": {"4": s([10e-6, 20e-6])}}
    lines = report.torch_api_tables({"torch-api-train-mlp25m-1x2": {2: train},
                                     "torch-api-allreduce-1x2": {2: calls}}).splitlines()
    assert lines[2] == ("| 1x2 | mlp25m | 140.0 (130.0-150.0) | 100.0 (100.0-100.0) | - | "
                        "1.40 (1.30-1.50) | - | yes |")
    assert lines[6] == "| 1x2 | 4 B | 2.0 us | 60.0 (50.0-70.0) us | - | - | 15.0 (10.0-20.0) |"
    assert report.torch_api_tables({}) == ""
