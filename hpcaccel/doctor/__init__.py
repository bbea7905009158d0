"""Preflight doctor: check a job's set-up before spending an allocation on it.

Run it exactly as training runs, with the same launcher, ranks and binding:

  mpirun -np 4 python -m hpcaccel.doctor --data /scratch/ds/index.json --out /scratch/run1
  srun --mpi=pmix python -m hpcaccel.doctor --threads 8 --grad-mb 100 --compute-ms 120
  python -m hpcaccel.doctor

Rank 0 prints one table (a line per rank: host, rank, local rank, CPUs, sockets, NUMA
nodes, threads), the facts (MPI library, thread level, transports, Horovod and what
`--backend auto` picks, --data, --out, an allreduce probe), then one line per problem or
note with what to do. Exit codes: 0 no problems, 1 problems found, 2 bad usage.

Modules: facts.py gathers (collectively), probe.py times allreduces, verdicts.py judges
(pure), report.py runs them in order and prints.
"""
