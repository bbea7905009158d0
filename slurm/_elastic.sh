#@param min_nodes      posint 1   elastic: go on after losing nodes while at least this many are left (--min-nodes)
#@param probe_seconds  posint 10  elastic: how often the batch shell asks Slurm for the state of the step's nodes (one scontrol call for all)
#@param checkpoint_seconds posint 300 elastic: hpcaccel.train checkpoints at least this often (--checkpoint-every-seconds): the most work a lost node costs
#@sbatch --no-kill
# --- elastic: a lost node does not end the job ---------------------------------------------
# --no-kill: Slurm keeps the allocation when one of its nodes fails. The training step runs
# on the nodes in hpcaccel_nodes; while it runs this shell asks Slurm every PROBE_SECONDS
# for their state (their ranks could otherwise wait forever on a dead peer). A node Slurm
# reports DOWN, NOT_RESPONDING or FAIL is lost: the step is ended and launched again on
# the nodes left, from the last checkpoint, while at least MIN_NODES are left, at most
# MAX_RESTARTS times. hpcaccel.train continues the checkpoint on fewer ranks with the same
# global batch (more samples per rank, in more micro-batches). A step that fails while
# Slurm reports every node up is not relaunched: the same error would come back.
MIN_NODES={{min_nodes}}
PROBE_SECONDS={{probe_seconds}}
# Slurm pings a node silent for SlurmdTimeout/3 and marks it NOT_RESPONDING when the ping
# fails, DOWN after SlurmdTimeout: the longest it takes Slurm to tell that a node is lost
SLURMD_TIMEOUT=$(scontrol show config 2>/dev/null | awk '$1 == "SlurmdTimeout" {print $3}')
SLURMD_TIMEOUT=${SLURMD_TIMEOUT:-300}
mapfile -t hpcaccel_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
hpcaccel_launches=0

hpcaccel_now() { date '+%Y-%m-%dT%H:%M:%S'; }

# hpcaccel_lost: the nodes of hpcaccel_nodes that Slurm reports lost, a line "NAME STATE"
# each. One controller query for all of them, the node states Slurm's own tools show: it
# needs no node name to resolve as a host (NodeAddr may differ) and opens no connection to
# a slurmd. Nothing when the controller cannot be asked (busy, failing over): that says
# nothing about the nodes.
hpcaccel_lost() {
  local IFS=,
  timeout 60 scontrol show node -o "${hpcaccel_nodes[*]}" 2>/dev/null | awk '
    { name = ""; state = ""
      for (i = 1; i <= NF; i++) {  # the first NodeName= and State=: a Reason= may hold words
        if (name == "" && $i ~ /^NodeName=/) name = substr($i, 10)
        if (state == "" && $i ~ /^State=/) state = substr($i, 7)
      }
      n = split(state, part, "+")  # e.g. MIXED+NOT_RESPONDING, DOWN+DRAIN+NOT_RESPONDING
      for (i = 1; i <= n; i++)
        if (part[i] ~ /^(DOWN|NOT_RESPONDING|FAIL|FAILING)$/) { print name, state; break }
    }'
}

# hpcaccel_await_lost RC: after the step failed with exit RC while Slurm reported every
# node up, set `lost` as hpcaccel_lost prints it. A launcher may end before Slurm knows:
# mpirun ends a second after losing a daemon, Slurm marks the node at its next ping. So
# Slurm is asked again every PROBE_SECONDS for up to SLURMD_TIMEOUT. Not after exit 2,
# hpcaccel.train's bad input, which no lost node causes.
hpcaccel_await_lost() {
  local deadline=$(($(date +%s) + SLURMD_TIMEOUT))
  lost=$(hpcaccel_lost)
  if [ -n "$lost" ] || [ "$1" = 2 ] || [ "$SLURMD_TIMEOUT" = 0 ]; then return; fi
  echo "hpcaccel: elastic: the step failed (exit $1) at $(hpcaccel_now) while Slurm reports every node up; asking Slurm again for up to $SLURMD_TIMEOUT s (SlurmdTimeout) whether a node was lost"
  while [ -z "$lost" ] && [ "$(date +%s)" -lt "$deadline" ] && [ "$got_usr1$got_term" = 00 ]; do
    sleep "$PROBE_SECONDS" & wait $!  # a trapped signal interrupts the wait
    lost=$(hpcaccel_lost)
  done
}

# from hpcaccel_lost's lines: hpcaccel_names "n2 n3", hpcaccel_says "n2 MIXED+NOT_RESPONDING, n3 DOWN"
hpcaccel_names() { awk '{print $1}' <<<"$1" | xargs; }
hpcaccel_says() { awk '{printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2}' <<<"$1"; }

# hpcaccel_launch_on NODE...: the step's launch restricted to these nodes (array `step`);
# a relaunch overlaps the ended step, which Slurm keeps holding CPUs until it declares the
# lost node down
hpcaccel_launch_on() {
  local k=$# nodes hosts n
  nodes=$(IFS=,; echo "$*")
  case ${launch[0]} in
    srun) step=("${launch[@]}" --nodes="$k" --ntasks=$((k * TASKS_PER_NODE)) --nodelist="$nodes")
          [ "$hpcaccel_launches" -gt 1 ] && step+=(--overlap) ;;
    mpirun) hosts=$(for n in "$@"; do printf '%s:%s,' "$n" "$TASKS_PER_NODE"; done)
            step=(mpirun -np $((k * TASKS_PER_NODE)) --host "${hosts%,}" "${launch[@]:3}")
            [ "$hpcaccel_launches" -gt 1 ] && step+=(--mca plm_slurm_args --overlap) ;;
  esac
}

# hpcaccel_end_step: end a step whose node was lost. Its processes on the nodes left get
# SIGKILL through Slurm (srun's tasks, or mpirun's daemons and their ranks); srun would then
# wait for the lost node's tasks until Slurm declares the node down, so it is told to abort
# (a second SIGINT within a second), and SIGKILLed if it has not ended 4 s later: nothing
# of the step runs any more, and the relaunch overlaps what Slurm still counts as its.
hpcaccel_end_step() {
  local s i
  for s in $(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -E '\.[0-9]+$'); do
    scancel --signal=KILL "$s" 2>/dev/null || true
  done
  sleep 1
  kill -INT "$step_pid" 2>/dev/null; sleep 0.3; kill -INT "$step_pid" 2>/dev/null
  for ((i = 0; i < 8; i++)); do
    kill -0 "$step_pid" 2>/dev/null || return 0
    sleep 0.5
  done
  kill -KILL "$step_pid" 2>/dev/null || true
}

# hpcaccel_run_elastic PROGRAM...: run the training step on the nodes left until it ends
# without a lost node; requeue on USR1 as hpcaccel_run does
hpcaccel_run_elastic() {
  local rc lost n next left
  while :; do
    if [ "$got_term" = 1 ]; then echo "hpcaccel: SIGTERM: not starting the step"; exit 143; fi
    if [ "$got_usr1" = 1 ]; then hpcaccel_requeue; exit "$REQUEUE_EXIT_CODE"; fi
    hpcaccel_launches=$((hpcaccel_launches + 1))
    export HPCACCEL_LAUNCH=$hpcaccel_launches  # a relaunch takes over the lock of the one before
    hpcaccel_launch_on "${hpcaccel_nodes[@]}"
    echo "hpcaccel: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} launch $hpcaccel_launches at $(hpcaccel_now) on ${#hpcaccel_nodes[@]} node(s) (${hpcaccel_nodes[*]}): ${step[*]} $*"
    next=$(($(date +%s) + PROBE_SECONDS))
    "${step[@]}" "$@" &
    step_pid=$!
    lost=""
    while kill -0 "$step_pid" 2>/dev/null; do
      sleep 1 & wait $!  # a trapped signal interrupts the wait, not the step
      if [ "$(date +%s)" -ge "$next" ] && [ "$got_usr1$got_term" = 00 ]; then
        next=$(($(date +%s) + PROBE_SECONDS))
        lost=$(hpcaccel_lost)
        if [ -n "$lost" ]; then
          echo "hpcaccel: elastic: lost node(s) $(hpcaccel_names "$lost") at $(hpcaccel_now): Slurm reports $(hpcaccel_says "$lost"); ending the step"
          hpcaccel_end_step
          break
        fi
      fi
    done
    wait "$step_pid"; rc=$?
    if [ "$rc" = 0 ]; then exit 0; fi
    if [ "$rc" = "$REQUEUE_EXIT_CODE" ]; then
      if [ "$got_term" = 1 ]; then
        echo "hpcaccel: checkpointed after SIGTERM: the job ends here; to continue, submit again with the same output directory"
      else
        hpcaccel_requeue
      fi
      exit "$rc"
    fi
    if [ -z "$lost" ]; then  # the step ended by itself: was a node lost?
      hpcaccel_await_lost "$rc"
      [ -n "$lost" ] && echo "hpcaccel: elastic: lost node(s) $(hpcaccel_names "$lost") at $(hpcaccel_now): the step failed (exit $rc) and Slurm reports $(hpcaccel_says "$lost")"
    fi
    if [ "$got_term" = 1 ]; then echo "hpcaccel: SIGTERM: not relaunching"; exit "$rc"; fi
    if [ -z "$lost" ]; then
      echo "hpcaccel: the step failed (exit $rc) while Slurm reports every node up: not relaunching"
      exit "$rc"
    fi
    left=()
    for n in "${hpcaccel_nodes[@]}"; do
      [[ " $(hpcaccel_names "$lost") " == *" $n "* ]] || left+=("$n")
    done
    hpcaccel_nodes=("${left[@]}")
    if [ "${#hpcaccel_nodes[@]}" -lt "$MIN_NODES" ]; then
      echo "hpcaccel: elastic: ${#hpcaccel_nodes[@]} node(s) left, fewer than min_nodes $MIN_NODES: the job ends here; resubmit with the same run directory to continue from the last checkpoint"
      exit "$rc"
    fi
    if [ $((hpcaccel_launches - 1)) -ge "$MAX_RESTARTS" ]; then
      echo "hpcaccel: elastic: already relaunched $((hpcaccel_launches - 1)) times (max_restarts): the job ends here"
      exit "$rc"
    fi
    echo "hpcaccel: elastic: relaunching at $(hpcaccel_now) on the ${#hpcaccel_nodes[@]} node(s) left (${hpcaccel_nodes[*]}) from the last checkpoint (relaunch $hpcaccel_launches of at most $MAX_RESTARTS)"
  done
}
