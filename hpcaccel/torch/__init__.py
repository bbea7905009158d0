"""hpcaccel.torch: Horovod's PyTorch API (horovod.torch, 0.28.1 names, signatures, defaults
and semantics) on hpcaccel's own reducer and MPI, in pure Python.

    import hpcaccel.torch as hvd        # or run an unchanged script with
    hvd.init()                          #   mpirun -np 8 python -m hpcaccel.horovod train.py
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

docs/scripts.md lists every name: supported, different (how), not supported (what instead).
Nothing here is imported by the rest of hpcaccel: it sits beside hpcaccel.train, on the
same reducer and control plane.
"""
from .basics import (Adasum, Average, HorovodInternalError, HostsUpdatedInterrupt, Max, Min,
                     Product, Sum, ccl_built, cross_rank, cross_size, cuda_built, ddl_built,
                     gloo_built, gloo_enabled, init, is_homogeneous, is_initialized, local_rank,
                     local_size, mpi_built, mpi_enabled, mpi_threads_supported, nccl_built, rank,
                     rocm_built, shutdown, size, start_timeline, stop_timeline)
from .compression import Compression
from .functions import (allgather_object, broadcast_object, broadcast_optimizer_state,
                        broadcast_parameters)
from .mpi_ops import (allgather, allgather_async, allreduce, allreduce_, allreduce_async,
                      allreduce_async_, alltoall, alltoall_async, barrier, broadcast, broadcast_,
                      broadcast_async, broadcast_async_, grouped_allgather,
                      grouped_allgather_async, grouped_allreduce, grouped_allreduce_,
                      grouped_allreduce_async, grouped_allreduce_async_, grouped_reducescatter,
                      grouped_reducescatter_async, join, poll, reducescatter,
                      reducescatter_async, sparse_allreduce_async, synchronize)
from .process_sets import ProcessSet, add_process_set, global_process_set, remove_process_set
from .unsupported import SyncBatchNorm, elastic
from .optimizer import DistributedOptimizer
from .extras import Job, Position, RankData  # hpcaccel's own calls beyond Horovod's API
