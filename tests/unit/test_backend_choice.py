"""--backend auto's rule (hpcaccel.comm.backend_choice.auto_backend): the faster reducer for the device."""
from hpcaccel.comm.backend_choice import auto_backend, device_type


def test_cpu_picks_the_mpi_reducer_even_with_horovod():
    assert auto_backend(["cpu"] * 4, [None] * 4, [True] * 4)[0] == "mpi"
    backend, why = auto_backend(["cpu", "cpu"])
    assert backend == "mpi" and "CPU" in why and "measured faster" in why
    assert auto_backend(["cuda", "cpu"], [None, None], [True, True])[0] == "mpi"  # ranks agree


def test_cuda_picks_horovod_only_with_gpu_operations_on_every_rank():
    assert auto_backend(["cuda"] * 3, [None] * 3, [True] * 3)[0] == "horovod"
    backend, why = auto_backend(["cuda"] * 3, [None] * 3, [True, False, True])
    assert backend == "mpi" and "without GPU operations on rank(s) [1]" in why
    backend, why = auto_backend(["cuda"] * 2, [None] * 2, [False, False])
    assert backend == "mpi" and "without GPU operations" in why and "rank(s)" not in why
    backend, why = auto_backend(["cuda"] * 2, ["no module", None], [False, True])
    assert backend == "mpi" and "not usable on rank(s) [0] (no module)" in why


def test_device_type():
    assert device_type("cpu") == "cpu" and device_type("cuda") == "cuda"
    assert device_type("cuda:1") == "cuda" and device_type("auto") in ("cpu", "cuda")
