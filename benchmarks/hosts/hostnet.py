"""Shared pieces of the benchmarks across emulated hosts (scripts/hosts.sh): the job's
layout, the link rate the hosts were shaped to, and gloo set up across network namespaces."""
import os
import socket


def layout(comm):
    """(hosts, ranks per host) of this job, identical on every rank."""
    from hpcaccel.comm.hierarchical import node_layout

    local, hosts, per_host = node_layout(comm)
    local.Free()
    return hosts, per_host


def link_gbit() -> float | None:
    """The shaped rate of every host's link in Gbit/s (HPCACCEL_BENCH_LINK_GBIT, which
    `make bench-hosts` sets from the rate it brings the hosts up with); None: unshaped."""
    value = os.environ.get("HPCACCEL_BENCH_LINK_GBIT")
    return float(value) if value else None


def init_gloo_across_hosts(comm):
    """torch.distributed (gloo) on rank 0's host address, over eth0 where hosts are
    namespaces; on one host, loopback as benchmarks/ddp_baseline.py does."""
    import ddp_baseline as ddp

    hosts, _ = layout(comm)
    if hosts > 1:
        os.environ["MASTER_ADDR"] = comm.bcast(socket.gethostbyname(socket.gethostname()))
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
    ddp.init_gloo(comm.Get_rank(), comm.Get_size(), comm.bcast(ddp.free_port() if comm.Get_rank() == 0 else None))
