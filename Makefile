# Two commands do everything on a fresh machine:
#   make train   set up, then train on the embedded digits dataset with 8 MPI ranks
#                (a new run each time: the previous one moves to runs/digits/previous/)
#   make test    set up (with test tools), then run every test: 1 process, 2 and 4 ranks
# and the quick loop while editing: make test-quick (unit tests and 2-rank smokes, minutes)
PY      := .venv/bin/python
NP      ?= 8
ARGS    ?=
TIMEOUT := timeout --signal=TERM --kill-after=30

.PHONY: setup setup-test train test test-unit test-mpi test-slurm test-bench-smoke bench clean \
        test-python-min test-hosts test-quick test-quick-unit test-quick-mpi test-quick-train

setup:
	@bash scripts/setup.sh train

setup-test:
	@bash scripts/setup.sh test

train: setup
	bash scripts/mpirun.sh $(NP) $(PY) -m hpcaccel.train --out runs/digits --overwrite true $(ARGS)

# make test: the stages below in turn, each timed (scripts/test_stages.sh); every stage runs
# even after one fails, and the end prints the stage times and the 15 slowest tests (also in
# build/test-reports/summary.txt). test-slurm and test-hosts share one munged: they run one
# after the other, never together. docs/testing.md: what each stage checks and costs.
TEST_STAGES := setup-test test-unit test-python-min test-mpi test-bench-smoke test-slurm \
               test-hosts test-user-setup
test:
	@bash scripts/test_stages.sh $(TEST_STAGES)

# The edit-test loop (a few minutes): the unit tests, then 2-rank smokes of the reducer, the
# script API and a training run (tests marked `quick`). make test is the full suite.
test-quick: setup-test
	@bash scripts/test_stages.sh test-quick-unit test-quick-mpi test-quick-train
test-quick-unit:
	$(TIMEOUT) 600 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) tests/unit $(call JUNIT,quick-unit)
test-quick-mpi:
	HPCACCEL_TEST_REPORT_NAME=quick-mpi $(TIMEOUT) 300 bash scripts/mpirun.sh 2 \
	  bash scripts/pytest_rank.sh -m quick tests/mpi
test-quick-train:
	$(TIMEOUT) 300 $(PY) -m pytest -q -p no:cacheprovider -m quick tests/integration $(call JUNIT,quick-train)

# JUnit XML for make test's report, where scripts/test_stages.sh asked for it.
JUNIT = $(if $(HPCACCEL_TEST_REPORTS),--junitxml=$(HPCACCEL_TEST_REPORTS)/$(1).xml)
# Single-process tests in parallel, one worker per core (pytest-xdist), tests handed out one
# by one, except that a module marked xdist_group (its tests share a run, a module fixture)
# goes to one worker whole, so the run is made once.
TEST_WORKERS ?= auto

test-unit:
	$(TIMEOUT) 3600 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup \
	  tests/unit tests/integration $(call JUNIT,unit-integration)

# Each MPI rank runs pytest; rank 0 reports, other ranks' output goes to build/test-logs.
MPI_NP ?= 2 4
test-mpi:
	@for np in $(MPI_NP); do \
	  echo "== MPI tests at $$np ranks"; \
	  HPCACCEL_TEST_REPORT_NAME=mpi $(TIMEOUT) 900 bash scripts/mpirun.sh $$np \
	    bash scripts/pytest_rank.sh tests/mpi || exit 1; \
	done

# Templates as real Slurm jobs on a one-node cluster that scripts/slurm_cluster.sh starts
# (installs slurm-wlm and munge if missing; needs root, skipped otherwise). A few minutes.
test-slurm:
	$(TIMEOUT) 900 $(PY) -m pytest -q -p no:cacheprovider tests/slurm $(call JUNIT,slurm)

# The benchmarks at tiny sizes, 2 ranks: they keep working (numbers not recorded).
test-bench-smoke:
	HPCACCEL_BENCH_SMOKE=1 HPCACCEL_BENCH_OUT=build/bench-smoke HPCACCEL_TEST_REPORT_NAME=bench \
	  $(TIMEOUT) 600 bash scripts/mpirun.sh 2 bash scripts/pytest_rank.sh benchmarks
	HPCACCEL_BENCH_SMOKE=1 HPCACCEL_BENCH_OUT=build/bench-smoke $(TIMEOUT) 600 \
	  $(PY) benchmarks/torch_api/run.py
	HPCACCEL_BENCH_SMOKE=1 HPCACCEL_BENCH_OUT=build/bench-smoke $(TIMEOUT) 300 \
	  $(PY) benchmarks/sharding/run.py

# Scaling benchmarks at 1, 2 and 4 ranks (1 thread per rank), then tables and plots.
# Records numbers, asserts nothing; results in benchmarks/results, see docs/benchmarks.md.
# Each benchmark runs in processes of its own: once Horovod starts, its background thread
# keeps running until the process exits and would slow whatever is measured after it.
# benchmarks/torch_api/run.py (a Horovod script on hpcaccel.torch, on Horovod, and as DDP)
# starts one MPI job per variant and repeat itself, always at 2 ranks.
BENCH_NP ?= 1 2 4
BENCH_RUNS := benchmarks/test_allreduce.py "benchmarks/test_throughput.py -k mlp25m" \
              "benchmarks/test_throughput.py -k cnn" benchmarks/test_bucket_size.py
bench: setup-test
	@for np in $(BENCH_NP); do for run in $(BENCH_RUNS); do \
	  echo "== $$run at $$np ranks"; \
	  bash scripts/mpirun.sh $$np bash scripts/pytest_rank.sh $$run -s || exit 1; \
	done; done
	@echo "== your own script at 2 ranks: hpcaccel.torch, Horovod, DDP (benchmarks/torch_api)"
	$(PY) benchmarks/torch_api/run.py
	$(PY) -m hpcaccel.bench report --results benchmarks/results --plots docs/img

clean:
	rm -rf runs build

# Set-up itself: a failed Horovod build remembered and shown by its first errors; and the
# set-up as a new user meets it (an unprivileged account, the system MPI hidden, no pip
# configuration: set-up, a short Horovod training run, the MPI tests; root only, skipped
# otherwise). First run on a machine: long (torch download, Horovod build); later: minutes.
.PHONY: test-user-setup horovod-retry
test-user-setup: setup-test
	$(TIMEOUT) 3600 $(PY) -m pytest -q -p no:cacheprovider tests/setup $(call JUNIT,user-setup)

# Build Horovod again after a failed build (set-up remembers a failure and does not retry).
horovod-retry:
	HPCACCEL_RETRY_HOROVOD=1 bash scripts/setup.sh train

# The unit tests under the oldest Python pyproject admits (requires-python), in a venv of
# its own under build/ made once (torch 2.8.0, the newest for Python 3.9); skipped with a
# message where no such Python is installed.
test-python-min:
	@bash scripts/test_python_min.sh $(call JUNIT,python-min)

# hpcaccel across 2 emulated hosts (scripts/hosts.sh: network namespaces, TCP between them)
# and a 2-node Slurm cluster on them. Needs root, skipped otherwise. A few minutes; the
# hosts are taken down at the end, and also here after a killed or failed run.
test-hosts:
	$(TIMEOUT) 1500 $(PY) -m pytest -q -p no:cacheprovider tests/hosts $(call JUNIT,hosts); rc=$$?; \
	  [ "$$(id -u)" != 0 ] || { bash scripts/slurm_cluster.sh stop 2 >/dev/null; \
	                           bash scripts/hosts.sh down >/dev/null; }; exit $$rc

# Benchmarks across 2 emulated hosts (scripts/hosts.sh, root only), links shaped to
# BENCH_HOSTS_RATE: allreduce sizes and training throughput at 2 x 1 and 2 x 2 ranks, side by
# side with torch DDP (gloo) and Horovod (flat and hierarchical); a Horovod script on
# hpcaccel.torch, on Horovod and as DDP at 2 x 1 (benchmarks/torch_api). A hosts instance of its
# own (HPCACCEL_HOSTS_INSTANCE=1), always taken down. Records numbers, asserts nothing;
# results in benchmarks/results/hosts-*.json, see docs/benchmarks.md "Across hosts".
BENCH_HOSTS_RATE ?= 1gbit
BENCH_HOSTS_GBIT ?= 1
.PHONY: bench-hosts
bench-hosts: setup-test
	@export HPCACCEL_HOSTS_INSTANCE=1 HPCACCEL_BENCH_LINK_GBIT=$(BENCH_HOSTS_GBIT); \
	trap 'bash scripts/hosts.sh down >/dev/null' EXIT; \
	bash scripts/hosts.sh up 2 --rate $(BENCH_HOSTS_RATE) || exit 1; \
	for k in 1 2; do \
	  echo "== allreduce at 2 hosts x $$k"; \
	  bash scripts/hosts.sh run $$k --timeout 1200 bash scripts/pytest_rank.sh benchmarks/hosts/test_allreduce_hosts.py -s || exit 1; \
	  for hier in 0 1; do \
	    HPCACCEL_BENCH_ONLY_HOROVOD=1 HOROVOD_HIERARCHICAL_ALLREDUCE=$$hier \
	      bash scripts/hosts.sh run $$k --timeout 600 bash scripts/pytest_rank.sh benchmarks/hosts/test_allreduce_hosts.py -s || exit 1; \
	  done; \
	done; \
	echo "== training at 2 hosts x 1"; \
	bash scripts/hosts.sh run 1 --timeout 2400 bash scripts/pytest_rank.sh benchmarks/hosts/test_train_hosts.py -s || exit 1; \
	echo "== bucket sizes at 2 hosts x 1"; \
	bash scripts/hosts.sh run 1 --timeout 1200 bash scripts/pytest_rank.sh benchmarks/test_bucket_size.py -s || exit 1; \
	echo "== your own script at 2 hosts x 1: hpcaccel.torch, Horovod, DDP"; \
	$(PY) benchmarks/torch_api/run.py --hosts
	$(PY) -m hpcaccel.bench report --results benchmarks/results --plots docs/img | grep '^plot:'

# --shard none / optimizer / gradients side by side (benchmarks/sharding/run.py): memory of
# the 25M MLP with AdamW at 1, 2 and 4 ranks, optimizer-step time and samples/s at 2 ranks
# against torch DDP (gloo), and, as root, 2 emulated hosts x 1 rank at BENCH_HOSTS_RATE with
# the link bound and a timeline's allgather overlap (a hosts instance of its own,
# HPCACCEL_HOSTS_INSTANCE=2, always taken down). Records numbers, asserts nothing; results in
# benchmarks/results/shard-*.json.
.PHONY: bench-shard
bench-shard: setup-test
	@export HPCACCEL_HOSTS_INSTANCE=2 HPCACCEL_BENCH_LINK_GBIT=$(BENCH_HOSTS_GBIT) \
	  BENCH_HOSTS_RATE=$(BENCH_HOSTS_RATE); \
	trap '[ "$$(id -u)" != 0 ] || bash scripts/hosts.sh down >/dev/null' EXIT; \
	$(TIMEOUT) 3600 $(PY) benchmarks/sharding/run.py
