"""Benchmarks under pytest-mpi: `mpirun -np N python -m pytest benchmarks --with-mpi`.

They record numbers and never assert speed. Rank 0 writes one JSON per benchmark and rank
count to $HPCACCEL_BENCH_OUT (default benchmarks/results); `python -m hpcaccel.bench report`
turns them into plots and docs/benchmarks.md. HPCACCEL_BENCH_SMOKE=1 runs tiny sizes (part
of `make test`, to keep the benchmarks working).
"""
import json
import os
import platform

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "mpi: run under mpirun (pytest-mpi)")


@pytest.fixture(scope="session")
def comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(scope="session")
def smoke():
    return os.environ.get("HPCACCEL_BENCH_SMOKE") == "1"


def machine_info(comm) -> dict:
    import mpi4py
    import torch
    from mpi4py import MPI

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import horovod
        hvd_version = horovod.__version__
    except Exception:  # noqa: BLE001
        hvd_version = None
    return {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "threads_per_rank": torch.get_num_threads(), "ranks": comm.Get_size(),
            "python": platform.python_version(), "torch": torch.__version__,
            "mpi4py": mpi4py.__version__, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "horovod": hvd_version}


@pytest.fixture(scope="session")
def record(comm):
    """record(name, data): rank 0 writes results/<name>-np<N>.json with machine info."""
    out = os.environ.get("HPCACCEL_BENCH_OUT", os.path.join(os.path.dirname(__file__), "results"))

    def write(name, data):
        info = machine_info(comm)
        if comm.Get_rank() == 0:
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, f"{name}-np{comm.Get_size()}.json")
            with open(path, "w") as fh:
                json.dump({"benchmark": name, "machine": info, **data}, fh, indent=1)
    return write


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_rank():
    """Compare backends with the same compute resources: 1 intra-op thread per rank unless
    HPCACCEL_BENCH_THREADS says otherwise."""
    import torch
    torch.set_num_threads(int(os.environ.get("HPCACCEL_BENCH_THREADS", "1")))
