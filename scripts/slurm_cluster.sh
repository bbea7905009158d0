#!/usr/bin/env bash
# A real Slurm cluster for the tests, of one node or of several emulated hosts:
#   scripts/slurm_cluster.sh start [SOCKETSxCORES [NODES]] | stop [NODES] | status [NODES]
#
# NODES 1 (default): this machine is the one node. NODES >= 2: one slurmd per emulated host
# of scripts/hosts.sh (brought up with NODES hosts if they are not), each in its host's
# namespaces with its own hostname (hpca-nodeI), address (198.18.0.I), spool, pid and log
# file, declared as a node of SOCKETS x CORES; slurmctld listens on the bridge address
# 198.18.0.254. munged's socket is a file, shared by every host. No stand-in GPUs there.
# Their Slurm node names (hpca-cnI) are not host names: no host resolves them, and Slurm
# reaches each node at its NodeAddr, as on clusters whose node names are not in DNS. Job
# scripts that take a node name for a host name fail here as they would there.
# The several-node cluster is a second cluster beside the one-node one (its own BASE,
# default /tmp/hpcaccel-slurm-nodes, and slurmctld port 6820), so both can run at once.
#
# As root on Debian: installs slurm-wlm and munge if missing, starts munged (as the munge
# user), slurmctld and slurmd with a generated slurm.conf that declares this machine as one
# node of SOCKETS x CORES (default 2x4, whatever it really has:
# SlurmdParameters=config_overrides), waits until the node is idle, and stops the daemons by
# their PIDs. Idempotent: `start` on a running cluster of the same layout and `stop` on a
# stopped one do nothing; `start` with another layout restarts.
#
# CPU binding: Slurm binds tasks (TaskPlugin=task/affinity) only when the declared CPUs
# exist; a layout larger than the machine (2x4 on 2 cores) gets task/none, because the
# kernel refuses affinity to CPUs that do not exist and task/affinity then fails every step
# ("Unable to layout tasks on given cpus"). So 2x1 on a 2-core machine shows real binding,
# 2x4 shows the scheduling and thread counts of a bigger node.
#
# GPUs: the node also declares 2 stand-in GPUs (Gres=gpu:2, env HPCACCEL_SLURM_GPUS) whose
# device files are /dev/null clones under BASE/dev. Nothing can compute on them, but Slurm
# allocates and binds them for real (CUDA_VISIBLE_DEVICES per task), which is what the GPU
# template's layout is about.
#
# Everything lives under BASE (default /tmp/hpcaccel-slurm; env HPCACCEL_SLURM_BASE); no
# system config is written. Clients need `export SLURM_CONF=BASE/etc/slurm.conf`, which
# `start` and `status` print. Exit codes: 0 ok (status: running), 1 failure (status: not
# running), 2 usage, 3 cannot run here (not root, no apt) - tests skip on 3.
set -euo pipefail

HOST=$(hostname -s)
LAYOUT=${2:-${HPCACCEL_SLURM_LAYOUT:-2x4}}
if [ "${1:-}" = start ]; then NODES=${3:-${HPCACCEL_SLURM_NODES:-1}}; else NODES=${2:-${HPCACCEL_SLURM_NODES:-1}}; fi
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "slurm_cluster: error: NODES must be a positive number, got '$NODES'" >&2; exit 2; }
if [ "$NODES" -gt 1 ]; then
  BASE=${HPCACCEL_SLURM_BASE:-/tmp/hpcaccel-slurm-nodes}
  CTLD_PORT=6820  # beside a one-node cluster's slurmctld (6817) in the same namespace
else
  BASE=${HPCACCEL_SLURM_BASE:-/tmp/hpcaccel-slurm}
  CTLD_PORT=6817
fi
CONF=$BASE/etc/slurm.conf
export SLURM_CONF=$CONF
GPUS=${HPCACCEL_SLURM_GPUS:-2}
HOSTS_SH=$(cd "$(dirname "$0")" && pwd)/hosts.sh
# names and addresses of the emulated hosts: as scripts/hosts.sh makes them
EMU_NODE=hpca-node
EMU_SLURM_NODE=hpca-cn  # Slurm's NodeName of host I: hpca-cnI (not a host name)
EMU_NET=198.18.0
MUNGE_PID=/run/munge/munged.pid
# munged is shared by the whole machine: stop it only if this script started it
MUNGE_OURS=$BASE/run/munged.ours

say() { echo "slurm_cluster: $*"; }
die() { echo "slurm_cluster: error: $*" >&2; exit "${2:-1}"; }

# alive PIDFILE: its process runs. A zombie does not: a daemon killed with its emulated host
# (scripts/hosts.sh down/kill) stays one until init reaps it, seconds later here, and a
# cluster taken for running then gets jobs its dead slurmd never runs.
alive() { [ -s "$1" ] && pid_runs "$(cat "$1")"; }
pid_runs() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "slurm/munge are not installed and installing them needs root" 3
  command -v apt-get >/dev/null || die "slurm/munge are not installed and there is no apt-get" 3
  say "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq || die "apt-get update failed (no network?)" 3
  # slurm-wlm pulls slurmctld, slurmd, the client tools and the mpi/pmix plugin
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurm-wlm munge openmpi-bin libopenmpi-dev >/dev/null || die "apt-get could not install slurm-wlm and munge" 3
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return  # a munged is already answering (ours or the system's)
  fi
  [ -s /etc/munge/munge.key ] || mungekey --create
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  # munged refuses to run as root ("PRNG seed dir is insecure")
  runuser -u munge -- /usr/sbin/munged
  mkdir -p "$BASE/run"
  touch "$MUNGE_OURS"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged did not start"
}

# The nodes: this machine, or the emulated hosts.
node_names() {
  if [ "$NODES" -gt 1 ]; then seq -f "$EMU_SLURM_NODE%g" 1 "$NODES"; else echo "$HOST"; fi
}

write_conf() {
  local sockets=${LAYOUT%x*} cores=${LAYOUT#*x} task=task/none
  [ $((sockets * cores)) -le "$(nproc)" ] && task=task/affinity
  local ctld_addr=127.0.0.1 dspool=$BASE/state/d dpid=$BASE/run/slurmd.pid dlog=$BASE/log/slurmd.log
  if [ "$NODES" -gt 1 ]; then
    # several slurmd: %n (the node name) keeps their files apart
    ctld_addr=$EMU_NET.254 dspool=$BASE/state/d-%n dpid=$BASE/run/slurmd-%n.pid dlog=$BASE/log/slurmd-%n.log
    GPUS=0
    local n
    for n in $(node_names); do mkdir -p "$BASE/state/d-$n" "$BASE/tmp/$n"; done
  fi
  mkdir -p "$BASE/etc" "$BASE/state/ctld" "$BASE/state/d" "$BASE/run" "$BASE/log" "$BASE/dev"
  local gres="" i
  if [ "$GPUS" -gt 0 ]; then
    gres="Gres=gpu:$GPUS "
    for ((i = 0; i < GPUS; i++)); do  # stand-in GPU devices: same numbers as /dev/null
      [ -c "$BASE/dev/gpu$i" ] || mknod "$BASE/dev/gpu$i" c 1 3
    done
    # slurmd reads gres.conf next to slurm.conf
    echo "NodeName=$HOST Name=gpu File=$BASE/dev/gpu[0-$((GPUS - 1))]" >"$BASE/etc/gres.conf"
  else
    rm -f "$BASE/etc/gres.conf"
  fi
  cat >"$CONF.new" <<EOF
# generated by scripts/slurm_cluster.sh: a test cluster, jobs run as root
ClusterName=hpcaccel
SlurmctldHost=$HOST($ctld_addr)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs restart after about cred_expire + 1 s (default 121 s)
AuthInfo=cred_expire=10
# plain srun wires up Open MPI ranks; the templates say --mpi=pmix anyway
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
# task/affinity binds tasks only where the declared CPUs exist (see scripts/slurm_cluster.sh)
TaskPlugin=$task
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# sched_interval=2: a requeued job becomes eligible cred_expire + 1 s later, but nothing
# wakes the scheduler then; with the default 60 s it sat pending ~30 s more (measured)
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=5,sched_interval=2
# otherwise a job larger than the node pends forever instead of being refused
EnforcePartLimits=ALL
ReturnToService=2
KillWait=5
InactiveLimit=0
# no accounting: finished jobs stay visible to scontrol this long
MinJobAge=300
MailProg=/bin/true
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$dspool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$dpid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$dlog
EOF
  # The emulated hosts share one /tmp; srun's PMIx plugin keeps per-step directories under
  # TmpFS (/tmp/spmix_appdir_UID_JOB.STEP), which two nodes of one step would both create.
  [ "$NODES" -gt 1 ] && echo "TmpFS=$BASE/tmp/%n" >>"$CONF.new"
  # An emulated host that is killed (scripts/hosts.sh kill) is declared down after this
  # long instead of the default 300 s, so a --no-kill (elastic) job that lost it completes
  # within a test's time: its epilog waits on every node of the allocation. Slurm pings a
  # node silent for a third of it and marks it NOT_RESPONDING when that fails, which is
  # when an elastic job learns of the loss: 10-20 s after the kill here (measured).
  [ "$NODES" -gt 1 ] && echo "SlurmdTimeout=30" >>"$CONF.new"
  cat >>"$CONF.new" <<EOF
# lets the node declare another layout than the machine has
SlurmdParameters=config_overrides
GresTypes=gpu
# layout $LAYOUT gpus $GPUS nodes $NODES
EOF
  local i addr=127.0.0.1 name=$HOST hostname=$HOST
  for ((i = 1; i <= NODES; i++)); do
    [ "$NODES" -gt 1 ] && name=$EMU_SLURM_NODE$i hostname=$EMU_NODE$i addr=$EMU_NET.$i
    echo "NodeName=$name NodeHostname=$hostname NodeAddr=$addr CPUs=$((sockets * cores)) Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=1 RealMemory=4000 ${gres}State=UNKNOWN" >>"$CONF.new"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF.new"
}

# one word for all nodes: their common state, "mixed" when they differ, "missing" when
# slurmctld does not list every node
node_state() {
  local states
  states=$(sinfo -h -N -o %t 2>/dev/null | sort -u)
  [ "$(sinfo -h -N -o %N 2>/dev/null | sort -u | wc -l)" -eq "$NODES" ] || { echo "${states:+missing}"; return; }
  [ "$(echo "$states" | wc -l)" -eq 1 ] && echo "$states" || echo mixed
}

slurmd_pidfile() {  # slurmd_pidfile NODE
  if [ "$NODES" -gt 1 ]; then echo "$BASE/run/slurmd-$1.pid"; else echo "$BASE/run/slurmd.pid"; fi
}

running() {
  alive "$BASE/run/slurmctld.pid" || return 1
  local n
  for n in $(node_names); do alive "$(slurmd_pidfile "$n")" || return 1; done
}

ensure_hosts() {  # NODES emulated hosts up (a different count: brought up anew)
  [ "$NODES" -gt 1 ] || return 0
  if ! bash "$HOSTS_SH" status 2>/dev/null | grep -q "^hosts: $NODES up"; then
    local rc=0
    bash "$HOSTS_SH" up "$NODES" || rc=$?
    [ $rc = 0 ] || die "could not start $NODES emulated hosts (scripts/hosts.sh up $NODES)" "$([ $rc = 3 ] && echo 3 || echo 1)"
  fi
}

start_slurmds() {
  if [ "$NODES" -le 1 ]; then
    slurmd
    return
  fi
  local i
  for ((i = 1; i <= NODES; i++)); do
    # inside host i (its network, hostname and /etc/hosts); slurmd daemonizes there
    bash "$HOSTS_SH" exec "$i" slurmd -N "$EMU_SLURM_NODE$i"
  done
}

stop_slurmds() {  # every slurmd this script may have started, in either mode
  local f
  for f in "$BASE"/run/slurmd.pid "$BASE"/run/slurmd-*.pid; do
    [ -e "$f" ] && stop_pid slurmd "$f"
  done
  return 0
}

stop_pid() {  # stop_pid NAME PIDFILE: TERM, wait up to 10 s, then KILL
  local name=$1 file=$2 pid
  alive "$file" || { rm -f "$file"; return 0; }
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    pid_runs "$pid" || { rm -f "$file"; say "stopped $name (pid $pid)"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$file"
  say "killed $name (pid $pid)"
}

cmd_start() {
  [[ $LAYOUT =~ ^[1-9][0-9]*x[1-9][0-9]*$ ]] || die "layout must be SOCKETSxCORES like 2x4, got '$LAYOUT'" 2
  [[ $GPUS =~ ^[0-9]+$ ]] || die "HPCACCEL_SLURM_GPUS must be a number, got '$GPUS'" 2
  [ "$(id -u)" = 0 ] || die "must run as root (the daemons and the jobs run as root)" 3
  write_conf  # to $CONF.new: a running cluster with the same configuration is left alone
  if running && [ -n "$(node_state)" ] && cmp -s "$CONF" "$CONF.new"; then
    rm -f "$CONF.new"
    say "already running ($NODES node(s): $(node_state), layout $LAYOUT); export SLURM_CONF=$CONF"
    return 0
  fi
  install_packages
  ensure_hosts
  start_munge
  # leftovers of an earlier run, or a cluster with another configuration
  stop_slurmds
  stop_pid slurmctld "$BASE/run/slurmctld.pid"
  mv -f "$CONF.new" "$CONF"
  rm -f "$BASE"/log/slurmd*.log; : >"$BASE/log/slurmctld.log"
  # -c: start with no saved jobs, so every start is a clean cluster
  slurmctld -c
  start_slurmds
  local state=""
  for _ in $(seq 300); do  # up to 30 s; usually idle within a second
    state=$(node_state)
    case $state in idle) break ;; esac
    sleep 0.1
  done
  if [ "$state" != idle ]; then
    tail -n 20 "$BASE/log/slurmctld.log" "$BASE/log/slurmd.log" >&2 || true
    die "nodes $(node_names | xargs) are '${state:-unknown}', not idle, after 30 s (logs in $BASE/log)"
  fi
  say "running: node(s) $(node_names | xargs) idle, layout $LAYOUT, $GPUS stand-in GPUs ($(sed -n 's/^TaskPlugin=//p' "$CONF")); export SLURM_CONF=$CONF"
}

cmd_stop() {
  stop_slurmds
  stop_pid slurmctld "$BASE/run/slurmctld.pid"
  if [ -e "$MUNGE_OURS" ]; then
    stop_pid munged "$MUNGE_PID"
    rm -f "$MUNGE_OURS"
  fi
}

cmd_status() {
  local ctld=stopped d=stopped
  alive "$BASE/run/slurmctld.pid" && ctld="running (pid $(cat "$BASE/run/slurmctld.pid"))"
  local n pids=""
  for n in $(node_names); do alive "$(slurmd_pidfile "$n")" && pids="$pids $(cat "$(slurmd_pidfile "$n")")"; done
  [ -n "$pids" ] && d="running (pid$pids)"
  echo "slurmctld: $ctld"
  echo "slurmd:    $d"
  if running; then
    echo "nodes:     $(node_names | xargs) $(node_state), $(sed -n 's/^# layout //p' "$CONF"), $(grep ^TaskPlugin= "$CONF")"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  return 1
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start [SOCKETSxCORES [NODES]] | stop [NODES] | status [NODES]   (BASE: \$HPCACCEL_SLURM_BASE, default /tmp/hpcaccel-slurm)" >&2; exit 2 ;;
esac
