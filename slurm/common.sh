# shellcheck shell=bash
# Shared by single_node.sbatch, multi_node.sbatch and sweep.sbatch (sourced, not run). Everything a distvit job on
# Slurm needs besides the launch itself: run directory, head node, port, process counts, signals,
# requeue. Settings (environment variables, all optional):
#   DISTVIT_HOME            repository with slurm/ and distvit/ (default: the submit directory)
#   DISTVIT_PYTHON          python with distvit installed (default: python3)
#   DISTVIT_MAX_REQUEUES    bound on automatic requeues (default: 3)
#   DISTVIT_RDZV_TIMEOUT    seconds the nodes may take to meet at the rendezvous (default: 300)
#   DISTVIT_PROCS_PER_NODE  processes per node (default: GPUs on the node, else Slurm tasks per node)
# Only a USR1 (the time-limit warning) makes the job requeue itself; SIGTERM (scancel, preemption) and
# a STOP file checkpoint and stop without a requeue.

distvit_die() {
  echo "distvit-slurm: error: $*" >&2
  exit 2
}

# Processes per node: one per GPU Slurm gave the node; on CPU-only nodes one per Slurm task.
distvit_procs_per_node() {
  if [[ -n "${DISTVIT_PROCS_PER_NODE:-}" ]]; then
    echo "$DISTVIT_PROCS_PER_NODE"
    return
  fi
  local gpus=0
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    gpus=$SLURM_GPUS_ON_NODE
  elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]]; then
    gpus=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)
  fi
  if (( gpus > 0 )); then
    echo "$gpus"
  elif [[ -n "${SLURM_NTASKS_PER_NODE:-}" ]]; then
    echo "${SLURM_NTASKS_PER_NODE%%(*}"   # "2(x3)" -> 2
  else
    echo $(( ${SLURM_NTASKS:-1} / ${SLURM_JOB_NUM_NODES:-1} > 0 ? ${SLURM_NTASKS:-1} / ${SLURM_JOB_NUM_NODES:-1} : 1 ))
  fi
}

# distvit_init CONFIG [key=value ...]: sets CONFIG, OVERRIDES (with train.resume=auto, so a requeued
# job continues from its checkpoint), RUN_DIR, LOG_DIR, HEAD_NODE, PORT, NNODES, PROCS_PER_NODE,
# WORLD, and traps the signals.
distvit_init() {
  [[ $# -ge 1 ]] || distvit_die "usage: sbatch [options] $0 CONFIG [key=value ...]"
  [[ -n "${SLURM_JOB_ID:-}" ]] || distvit_die "run this script with sbatch (SLURM_JOB_ID is not set)"
  DISTVIT_PYTHON=${DISTVIT_PYTHON:-python3}
  DISTVIT_MAX_REQUEUES=${DISTVIT_MAX_REQUEUES:-3}
  DISTVIT_RDZV_TIMEOUT=${DISTVIT_RDZV_TIMEOUT:-300}
  CONFIG=$1
  shift
  OVERRIDES=("$@" "train.resume=auto")
  RUN_DIR=""
  SIGNALLED=""
  trap 'distvit_on_signal USR1' USR1
  trap 'distvit_on_signal TERM' TERM
  # the config alone (cheap: training's own preflight hashes the shards, once)
  RUN_DIR=$("$DISTVIT_PYTHON" -m distvit.cli config --config "$CONFIG" "${OVERRIDES[@]}" --get run.dir) ||
    distvit_die "the config did not validate (message above); nothing was started"
  LOG_DIR="$RUN_DIR/logs"
  mkdir -p "$LOG_DIR"
  # A previous job's stop record must not be taken for this job's (a crash before training starts).
  rm -f "$RUN_DIR/stopped.json"
  if [[ -n "$SIGNALLED" ]]; then  # signalled while the config was read
    touch "$RUN_DIR/STOP"
  fi
  HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  PORT=$(( 10000 + SLURM_JOB_ID % 20000 ))   # per job (two jobs on one node do not clash), below the ephemeral range
  NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  PROCS_PER_NODE=$(distvit_procs_per_node)
  WORLD=$(( NNODES * PROCS_PER_NODE ))
  export CONFIG RUN_DIR LOG_DIR HEAD_NODE PORT NNODES PROCS_PER_NODE WORLD DISTVIT_PYTHON DISTVIT_RDZV_TIMEOUT
  echo "distvit-slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) x $PROCS_PER_NODE" \
       "process(es), head $HEAD_NODE:$PORT, run dir $RUN_DIR"
}

# A signal to the batch shell (--signal=B:USR1@T before the time limit, scancel --signal=USR1 --batch,
# or SIGTERM on scancel/preemption) asks the trainer to checkpoint and stop: the ranks agree on the
# step through the STOP file (the launcher itself must not get USR1: it would die of it).
distvit_on_signal() {
  SIGNALLED=$1
  if [[ -n "${RUN_DIR:-}" ]]; then
    echo "distvit-slurm: got SIG$1: asking the trainer to checkpoint and stop ($RUN_DIR/STOP)"
    touch "$RUN_DIR/STOP"
  fi
}

# distvit_run COMMAND...: run the launch in the background and wait for it, through signals; its process
# id is DISTVIT_CHILD meanwhile (sweep.sbatch passes a signal on to it).
distvit_run() {
  "$@" &
  DISTVIT_CHILD=$!
  local child=$DISTVIT_CHILD
  STATUS=0
  while true; do
    wait "$child" && STATUS=0 || STATUS=$?
    # wait returns > 128 when a trapped signal interrupted it; the child is still running then
    if ! kill -0 "$child" 2> /dev/null; then
      break
    fi
  done
  wait "$child" 2> /dev/null && STATUS=0 || STATUS=$?
}

# After the launch: finished, stopped (requeued after the time-limit warning USR1, bounded), or failed.
distvit_finish() {
  if [[ -f "$RUN_DIR/summary.json" ]]; then
    echo "distvit-slurm: run finished ($RUN_DIR/summary.json)"
    exit 0
  fi
  if [[ -f "$RUN_DIR/stopped.json" ]]; then
    local restarts=${SLURM_RESTART_COUNT:-0}
    echo "distvit-slurm: run stopped at a checkpoint: $(cat "$RUN_DIR/stopped.json")"
    rm -f "$RUN_DIR/STOP"   # served; a late signal must not stop the next job at once
    if [[ "$SIGNALLED" != USR1 ]]; then
      # SIGTERM: scancel or preemption (Slurm requeues preempted jobs itself where so configured);
      # no signal here: the user stopped the run (STOP file, a signal to a rank). No requeue for those.
      echo "distvit-slurm: stopped (${SIGNALLED:-by a STOP file or a signal to a rank}); not requeueing." \
           "Resubmit to continue from the checkpoint (train.resume=auto)" >&2
      exit 3
    fi
    if (( restarts >= DISTVIT_MAX_REQUEUES )); then
      echo "distvit-slurm: not requeueing: $restarts requeue(s) reached DISTVIT_MAX_REQUEUES=$DISTVIT_MAX_REQUEUES;" \
           "resubmit to continue (train.resume=auto)" >&2
      exit 3
    fi
    echo "distvit-slurm: requeueing job $SLURM_JOB_ID (requeue $(( restarts + 1 )) of at most $DISTVIT_MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID" || echo "distvit-slurm: scontrol requeue failed (preempted jobs are requeued by Slurm)" >&2
    exit 0
  fi
  echo "distvit-slurm: training failed with status $STATUS; see $LOG_DIR. Fix the cause and resubmit:" \
       "the job resumes from the newest checkpoint (train.resume=auto)" >&2
  exit "$STATUS"
}
