#!/usr/bin/env bash
# Several emulated hosts on one machine, for trying and testing hpcaccel across nodes:
#
#   scripts/hosts.sh up N [--rate 1gbit]   N hosts (network namespaces on a bridge), optionally
#                                          every host's outgoing link shaped to RATE (tbf)
#   scripts/hosts.sh run K [--timeout S] CMD...   mpirun CMD with K ranks on every host
#   scripts/hosts.sh exec I CMD...         run CMD on host I (1-based), as that host
#   scripts/hosts.sh kill I                kill every process of host I (a host failing)
#   scripts/hosts.sh shape RATE|none       change the shaping of every host's link
#   scripts/hosts.sh status | down
#
# Host i is network namespace hpca-hI with eth0 = 198.18.0.I/24 (198.18.0.0/15 is reserved
# for network benchmarks: no real host lives there) and hostname hpca-nodeI in its own UTS
# namespace; the hosts and the root namespace meet on bridge hpca-br0 = 198.18.0.254. No
# default route, nothing forwarded or routed beyond that bridge. Each host also sees its own
# /etc/hosts (a bind mount in a private mount namespace) naming every host, so tools that
# resolve their own hostname (srun, slurmd) work; the machine's /etc/hosts is untouched.
#
# mpirun runs in the root namespace and starts its daemons on the hosts through an rsh
# agent (this script's `agent`), with TCP between hosts and shared memory within one.
# Ranks are not bound to cores: all hosts share this machine's CPUs.
#
# Everything is made and removed by name (hpca-*): `down` is idempotent and also cleans up
# after a crash or a killed test run (it kills whatever still runs inside the namespaces
# first); `up` runs `down` first. State lives in BASE (default /tmp/hpcaccel-hosts, env
# HPCACCEL_HOSTS_BASE). Exit codes: 0 ok (status: up), 1 failure (status: down), 2 usage,
# 3 cannot run here (not root, or the kernel lacks namespaces/bridges/tbf) - tests skip on 3.
set -euo pipefail

SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# HPCACCEL_HOSTS_INSTANCE=K (1..99; default 0) is a second, independent set of hosts beside
# the default one (benchmarks beside tests): namespaces hpcaK-hI, bridge hpcaK-br0 on
# 198.18.K.0/24, state in /tmp/hpcaccel-hosts-K; instance 0 keeps the names below.
INSTANCE=${HPCACCEL_HOSTS_INSTANCE:-0}
[[ $INSTANCE =~ ^[0-9]{1,2}$ ]] || { echo "hosts: error: HPCACCEL_HOSTS_INSTANCE must be 0..99" >&2; exit 2; }
TAG=$( [ "$INSTANCE" = 0 ] || echo "$INSTANCE" )
BASE=${HPCACCEL_HOSTS_BASE:-/tmp/hpcaccel-hosts${TAG:+-$TAG}}
NET=198.18.$INSTANCE
BRIDGE=hpca${TAG}-br0
NS_PREFIX=hpca${TAG}-h        # namespace of host I: hpca-hI
VETH_PREFIX=hpca${TAG}-v      # root-side end of host I's link: hpca-vI
HOST_PREFIX=hpca-node   # hostname of host I: hpca-nodeI
MAX_HOSTS=16

say() { echo "hosts: $*"; }
die() { echo "hosts: error: $*" >&2; exit "${2:-1}"; }
usage() {
  echo "usage: $0 up N [--rate RATE] | run K [--timeout S] CMD... | exec I CMD... | kill I | shape RATE|none | status | down" >&2
  exit 2
}

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (network namespaces and bridges need root)" 3
  local tool
  for tool in ip tc unshare; do
    command -v "$tool" >/dev/null || die "'$tool' is not installed (iproute2, util-linux)" 3
  done
}

count() { [ -s "$BASE/count" ] && cat "$BASE/count" || echo 0; }
ns() { echo "$NS_PREFIX$1"; }

our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NS_PREFIX}[0-9]+$" || true; }

check_index() {  # check_index I: a host that is up
  [[ $1 =~ ^[1-9][0-9]*$ ]] && [ "$1" -le "$(count)" ] || die "no host '$1' (hosts up: $(count))" 2
}

# in_host I CMD...: run CMD on host I: its network namespace, its hostname, its /etc/hosts.
# nsenter rather than `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup
# (slurmd refuses to start without it).
in_host() {
  local i=$1; shift
  exec nsenter --net="/run/netns/$(ns "$i")" unshare --uts --mount --propagation private sh -c \
    'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"' \
    "$HOST_PREFIX$i" "$BASE/etc-hosts" "$@"
}

kill_host() {  # kill_host I: SIGKILL everything running in host I's namespace
  local pids
  pids=$(ip netns pids "$(ns "$1")" 2>/dev/null || true)
  [ -z "$pids" ] && return 0
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  for _ in $(seq 50); do
    [ -z "$(ip netns pids "$(ns "$1")" 2>/dev/null)" ] && return 0
    sleep 0.1
  done
}

cmd_down() {
  need_root
  local n i
  for n in $(our_namespaces); do
    i=${n#"$NS_PREFIX"}
    kill_host "$i"
    ip netns del "$n" 2>/dev/null || true
  done
  # root-side veth ends vanish with their namespaces; remove any stray one, then the bridge
  for n in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${VETH_PREFIX}[0-9]+$" || true); do
    ip link del "$n" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -f "$BASE/count" "$BASE/rate" "$BASE/hostfile"* "$BASE/etc-hosts" "$BASE/agent"
  say "down"
}

apply_rate() {  # apply_rate RATE|none on every host's eth0 (egress of each host)
  local rate=$1 i
  for ((i = 1; i <= $(count); i++)); do
    ip netns exec "$(ns "$i")" tc qdisc del dev eth0 root 2>/dev/null || true
    if [ "$rate" != none ]; then
      ip netns exec "$(ns "$i")" tc qdisc add dev eth0 root tbf rate "$rate" burst 256k latency 20ms \
        || die "cannot shape with tbf at '$rate' (kernel without sch_tbf, or a bad rate)" 3
    fi
  done
  echo "$rate" >"$BASE/rate"
}

check_links() {  # every host reaches the bridge address over TCP (no ping binary here)
  local port i
  port=$(python3 - <<EOF
import socket; s = socket.socket(); s.bind(("$NET.254", 0)); print(s.getsockname()[1]); s.close()
EOF
)
  python3 - "$NET.254" "$port" "$(count)" <<'EOF' &
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64); s.settimeout(10)
for _ in range(int(sys.argv[3])):
    s.accept()[0].close()
EOF
  local listener=$!
  sleep 0.2
  for ((i = 1; i <= $(count); i++)); do
    ip netns exec "$(ns "$i")" timeout 10 python3 -c \
      "import socket; socket.create_connection(('$NET.254', $port), timeout=5).close()" \
      || { kill "$listener" 2>/dev/null; die "host $i cannot reach $NET.254 over the bridge (bridge netfilter dropping?)"; }
  done
  wait "$listener" || true
}

cmd_up() {
  local n=${1:-} rate=none
  [[ $n =~ ^[1-9][0-9]*$ ]] && [ "$n" -le $MAX_HOSTS ] || die "up: N must be 1..$MAX_HOSTS, got '${n}'" 2
  shift
  while [ $# -gt 0 ]; do
    case $1 in
      --rate) [ $# -ge 2 ] || usage; rate=$2; shift 2 ;;
      *) die "up: unknown option '$1'" 2 ;;
    esac
  done
  need_root
  cmd_down >/dev/null
  mkdir -p "$BASE"
  ip link add "$BRIDGE" type bridge 2>/dev/null || die "cannot create bridge $BRIDGE (kernel without bridge support?)" 3
  ip addr add "$NET.254/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  printf '127.0.0.1 localhost\n' >"$BASE/etc-hosts"
  : >"$BASE/hostfile"
  local i
  for ((i = 1; i <= n; i++)); do
    ip netns add "$(ns "$i")" 2>/dev/null || { cmd_down >/dev/null; die "cannot create network namespace $(ns "$i") (kernel without netns?)" 3; }
    ip link add "$VETH_PREFIX$i" type veth peer name eth0 netns "$(ns "$i")" \
      || { cmd_down >/dev/null; die "cannot create a veth pair (kernel without veth?)" 3; }
    ip link set "$VETH_PREFIX$i" master "$BRIDGE" up
    ip -n "$(ns "$i")" addr add "$NET.$i/24" dev eth0
    ip -n "$(ns "$i")" link set eth0 up
    ip -n "$(ns "$i")" link set lo up
    echo "$NET.$i $HOST_PREFIX$i" >>"$BASE/etc-hosts"
    echo "$NET.$i" >>"$BASE/hostfile"
    echo "$i" >"$BASE/count"
  done
  echo "$NET.254 $(hostname -s)" >>"$BASE/etc-hosts"
  # Open MPI's rsh agent: one fixed path, so mpirun can be given it as a single word
  printf '#!/bin/sh\nexec "%s" agent "$@"\n' "$SELF" >"$BASE/agent"
  chmod 755 "$BASE/agent"
  apply_rate "$rate"
  check_links
  say "up: $n host(s) $HOST_PREFIX{1..$n} at $NET.{1..$n}, bridge $BRIDGE $NET.254, rate $rate"
}

cmd_shape() {
  [ $# -eq 1 ] || usage
  need_root
  [ "$(count)" -gt 0 ] || die "no hosts are up (scripts/hosts.sh up N)"
  apply_rate "$1"
  say "every host's link: rate $1"
}

cmd_status() {
  local n
  n=$(count)
  if [ "$n" -gt 0 ] && [ "$(our_namespaces | wc -l)" -eq "$n" ] && ip link show "$BRIDGE" >/dev/null 2>&1; then
    echo "hosts: $n up ($HOST_PREFIX{1..$n}, $NET.{1..$n}), rate $(cat "$BASE/rate" 2>/dev/null || echo none)"
    return 0
  fi
  echo "hosts: down$( [ -n "$(our_namespaces)" ] && echo " (leftover namespaces: $(our_namespaces | xargs); run: $0 down)")"
  return 1
}

# Open MPI calls AGENT [options] HOST COMMAND...: run COMMAND as a shell line on HOST.
cmd_agent() {
  while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
  [ $# -ge 2 ] || die "agent: expected HOST COMMAND..." 2
  local host=$1 i; shift
  case $host in
    "$NET".*) i=${host#"$NET".} ;;
    "$HOST_PREFIX"*) i=${host#"$HOST_PREFIX"} ;;
    *) die "agent: '$host' is not an emulated host" 2 ;;
  esac
  check_index "$i"
  in_host "$i" sh -c "$*"
}

cmd_run() {
  local k=${1:-} limit=${HPCACCEL_HOSTS_TIMEOUT:-600}
  [[ $k =~ ^[1-9][0-9]*$ ]] || die "run: K (ranks per host) must be a positive number, got '$k'" 2
  shift
  if [ "${1:-}" = --timeout ]; then
    [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "run: --timeout needs seconds" 2
    limit=$2; shift 2
  fi
  [ $# -gt 0 ] || usage
  local n
  n=$(count)
  [ "$n" -gt 0 ] || die "no hosts are up (scripts/hosts.sh up N)"
  sed "s/\$/ slots=$k/" "$BASE/hostfile" >"$BASE/hostfile.$k"
  [ -x "$ROOT/.venv/bin/python" ] && export PATH="$ROOT/.venv/bin:$PATH"
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  # TCP only on the hosts' network (both Open MPI's own wire-up and the ranks' traffic);
  # vader = shared memory between the ranks of one host. No binding: the hosts share CPUs.
  exec timeout --signal=TERM --kill-after=15 "$limit" \
    mpirun -np $((n * k)) --hostfile "$BASE/hostfile.$k" --map-by "ppr:$k:node" --bind-to none \
    --mca plm_rsh_agent "$BASE/agent" --mca plm_rsh_no_tree_spawn 1 \
    --mca oob_tcp_if_include "$NET.0/24" --mca btl_tcp_if_include "$NET.0/24" \
    --mca btl self,vader,tcp "$@"
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  shape) shift; cmd_shape "$@" ;;
  run) shift; cmd_run "$@" ;;
  exec) shift; [ $# -ge 2 ] || usage; need_root; check_index "$1"; in_host "$@" ;;
  kill) [ $# -eq 2 ] || usage; need_root; check_index "$2"; kill_host "$2"; say "host $2: every process killed" ;;
  agent) shift; cmd_agent "$@" ;;
  *) usage ;;
esac
