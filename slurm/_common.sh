#@param job_name       name   hpcaccel   job name (--job-name)
#@param nodes          posint 1          nodes (--nodes)
#@param time           time   01:00:00   wall-clock limit (--time): HH:MM:SS, D-HH:MM:SS or minutes
#@param partition      word   ''         partition (--partition), or several: gpu,gpu-long; empty: the site's default
#@param account        name   ''         account to charge (--account)
#@param qos            name   ''         quality of service (--qos)
#@param mem            word   ''         memory per node (--mem), e.g. 64G; 0: all of it
#@param constraint     word   ''         node features (--constraint), Slurm's syntax: skylake&ib, [rack1|rack2]
#@param output         path   %x-%j.out  job log (--output); %x job name, %j job id
#@param chdir          path   ''         working directory (--chdir); default: where sbatch ran
#@param signal_seconds posint 300        Slurm sends USR1 this many seconds before the time limit: the ranks checkpoint and the job requeues itself
#@param max_restarts   count  20         requeue at most this many times (a guard against a job that never finishes)
#@param modules        words  ''         environment modules to load, space separated
#@param setup_script   path   ''         a site script to source after the module loads (anything not covered here)
#@param conda_env      name   ''         conda environment to activate
#@param venv           path   ''         Python virtual environment to activate
#@param python         path   python     the Python that has hpcaccel installed
#@param launcher       srun|mpirun srun  srun --mpi=pmix, or mpirun for sites whose Slurm has no PMIx
#@sbatch --job-name={{job_name}}
#@sbatch --nodes={{nodes}}
#@sbatch --time={{time}}
#@sbatch --partition={{partition}}
#@sbatch --account={{account}}
#@sbatch --qos={{qos}}
#@sbatch --mem={{mem}}
#@sbatch --constraint={{constraint}}
#@sbatch --output={{output}}
#@sbatch --chdir={{chdir}}
#@sbatch --signal=B:USR1@{{signal_seconds}}
#@sbatch --requeue
#@sbatch --open-mode=append
# Rendered from template {{template}} by `python -m hpcaccel.slurm render`.
# --signal=B:USR1: Slurm warns this batch shell before the time limit; --requeue and
# --open-mode=append: the job may run several times (requeued), appending to one log.

# --- stop signals, first of all: a signal before the traps would kill this shell ---------
# USR1 (the time-limit warning, or `scancel --batch --signal=USR1`): the ranks checkpoint,
# exit with REQUEUE_EXIT_CODE, and this job requeues itself to resume from the checkpoint.
# TERM (scancel, preemption, the time limit itself): the job ends, no requeue (a cancelled
# job must not come back); under srun the ranks checkpoint first (Slurm signals them too).
REQUEUE_EXIT_CODE={{requeue_exit_code}}
MAX_RESTARTS={{max_restarts}}
LAUNCHER={{launcher}}
PYTHON={{python}}
step_pid=""
got_usr1=0
got_term=0
hpcaccel_forward_stop() {
  # USR1 in both cases: srun passes it to every rank; mpirun forwards USR1 too, whereas on
  # TERM it would end the ranks itself. The trainer treats USR1 and TERM alike.
  if [ -n "$step_pid" ]; then
    kill -USR1 "$step_pid" 2>/dev/null || true
  fi
}
trap 'got_usr1=1; echo "hpcaccel: batch shell got SIGUSR1: asking the ranks to checkpoint"; hpcaccel_forward_stop' USR1
trap 'got_term=1; echo "hpcaccel: batch shell got SIGTERM: asking the ranks to checkpoint"; hpcaccel_forward_stop' TERM

hpcaccel_requeue() {
  local restarts=${SLURM_RESTART_COUNT:-0}
  if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    echo "hpcaccel: checkpointed, but not requeueing: already restarted $restarts times (max_restarts)"
    return
  fi
  echo "hpcaccel: checkpointed; requeueing job $SLURM_JOB_ID (restart $((restarts + 1))), it resumes with --resume auto"
  scontrol requeue "$SLURM_JOB_ID"
}

# hpcaccel_run LAUNCH... : run the training step in the background (so the traps can run
# while it does), wait for every rank to exit, and requeue if they checkpointed on USR1.
hpcaccel_run() {
  if [ "$got_term" = 1 ]; then
    echo "hpcaccel: SIGTERM before the ranks started: not starting"; exit 143
  fi
  if [ "$got_usr1" = 1 ]; then  # nothing ran, so nothing to save: just come back later
    hpcaccel_requeue; exit "$REQUEUE_EXIT_CODE"
  fi
  echo "hpcaccel: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: $*"
  "$@" &
  step_pid=$!
  local rc
  while :; do
    wait "$step_pid"; rc=$?
    kill -0 "$step_pid" 2>/dev/null || break  # alive: a trapped signal interrupted wait
  done
  wait "$step_pid"; rc=$?  # the step's own exit status (bash remembers it)
  if [ "$rc" = "$REQUEUE_EXIT_CODE" ]; then
    if [ "$got_term" = 1 ]; then
      echo "hpcaccel: checkpointed after SIGTERM: the job ends here; to continue, submit again with the same output directory"
    else
      hpcaccel_requeue
    fi
  fi
  exit "$rc"
}

# --- site set-up ---------------------------------------------------------------------------
{{site_setup}}
