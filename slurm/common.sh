# slurm/common.sh: sourced by the *.sbatch scripts (not run on its own).
# Environment setup, device detection, CUDA-aware MPI settings and signal forwarding, shared so
# that the three job scripts stay short and behave the same way.

disdl_die() { echo "disdl: error: $*" >&2; exit 2; }
disdl_log() { echo "disdl: $*"; }

# Load modules, activate the venv, make the repo importable and set threads per rank.
disdl_setup_env() {
  if [[ -n ${MODULES:-} ]]; then
    command -v module >/dev/null 2>&1 || disdl_die "MODULES='$MODULES' set but no 'module' command on this node"
    # shellcheck disable=SC2086  # MODULES is a word list
    module load $MODULES || disdl_die "module load $MODULES failed"
  fi
  if [[ -n ${VENV:-} ]]; then
    [[ -f $VENV/bin/activate ]] || disdl_die "VENV=$VENV has no bin/activate"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  fi
  PYTHON=${PYTHON:-python}
  command -v "$PYTHON" >/dev/null || disdl_die "'$PYTHON' not found: set VENV=/path/to/venv or MODULES"
  # the in-tree packages, whether or not the package is pip-installed into the venv
  export PYTHONPATH="$DISDL_HOME${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  # one thread per allocated core of each rank; disdl_mpi reports what it used
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
}

# DEVICE=auto|cpu|cuda -> sets DISDL_DEVICE; GPUs are detected from SLURM's allocation and nvidia-smi.
disdl_detect_device() {
  local want=${DEVICE:-auto} gpus=0
  if [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} != 0 ]]; then
    gpus=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L | grep -c '^GPU')
  fi
  case $want in
    auto) if (( gpus > 0 )); then DISDL_DEVICE=cuda; else DISDL_DEVICE=cpu; fi ;;
    cpu|cuda) DISDL_DEVICE=$want ;;
    *) disdl_die "DEVICE must be auto, cpu or cuda, got '$want'" ;;
  esac
  if [[ $DISDL_DEVICE == cuda ]]; then
    (( gpus > 0 )) || disdl_log "warning: DEVICE=cuda but no GPU is visible on $(hostname -s)"
    disdl_cuda_mpi_env
  fi
  disdl_log "node $(hostname -s): $gpus GPU(s) visible, device=$DISDL_DEVICE"
}

# Defaults for CUDA-aware MPI over UCX; every one can be preset by the site or user (CUDA_MPI_ENV=0
# skips them all). How to check it is really used: slurm/README.md, "Is MPI CUDA-aware?".
disdl_cuda_mpi_env() {
  [[ ${CUDA_MPI_ENV:-1} == 1 ]] || return 0
  export OMPI_MCA_pml=${OMPI_MCA_pml:-ucx}                 # Open MPI: UCX carries GPU buffers
  export OMPI_MCA_btl=${OMPI_MCA_btl:-^openib,smcuda}      # no legacy transports next to UCX
  export UCX_TLS=${UCX_TLS:-rc,sm,cuda_copy,cuda_ipc,gdr_copy}
  export UCX_MEMTYPE_CACHE=${UCX_MEMTYPE_CACHE:-n}         # avoid stale host/device pointer cache
  export MPICH_GPU_SUPPORT_ENABLED=${MPICH_GPU_SUPPORT_ENABLED:-1}  # Cray MPICH
  export MPIR_CVAR_ENABLE_GPU=${MPIR_CVAR_ENABLE_GPU:-1}           # MPICH ch4
  disdl_log "CUDA-aware MPI env: OMPI_MCA_pml=$OMPI_MCA_pml UCX_TLS=$UCX_TLS UCX_MEMTYPE_CACHE=$UCX_MEMTYPE_CACHE"
}

# Results folder: $RESULTS_ROOT/$SLURM_JOB_ID (RESULTS_ROOT defaults to $SLURM_SUBMIT_DIR/results).
# A requeued job keeps its id, so it finds its own checkpoints again.
disdl_results_dir() {
  DISDL_OUT=${OUT:-${RESULTS_ROOT:-$SLURM_SUBMIT_DIR/results}/$SLURM_JOB_ID}
  mkdir -p "$DISDL_OUT" || disdl_die "cannot create results folder $DISDL_OUT"
  disdl_log "results folder: $DISDL_OUT"
}

# Signals: SLURM sends --signal=B:USR1@T to this batch shell only; forward it (and TERM) so the
# ranks write a checkpoint, then requeue if the work did not finish.
#  - train (DISDL_SWEEP=0): the background child is srun/mpirun itself; both forward the signal
#    to every rank.
#  - sweeps (DISDL_SWEEP=1): the child is a Python driver that runs one MPI job after another in
#    its own session; signal the job's running steps (the current point's ranks) through SLURM,
#    and TERM the driver so it starts no new point. Finished points are kept; the requeued job
#    reruns the driver, which skips them.
DISDL_STEP_PID=""
DISDL_GOT_SIGNAL=""
DISDL_SWEEP=${DISDL_SWEEP:-0}
disdl_on_signal() {
  DISDL_GOT_SIGNAL=$1
  disdl_log "got SIG$1 at $(date +%T); forwarding to pid ${DISDL_STEP_PID:-(none running)}"
  if [[ $DISDL_SWEEP == 1 ]]; then
    scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null   # steps only, not this batch shell
    [[ -n $DISDL_STEP_PID ]] && kill -TERM "$DISDL_STEP_PID" 2>/dev/null
  else
    [[ -n $DISDL_STEP_PID ]] && kill -s "$1" "$DISDL_STEP_PID" 2>/dev/null
  fi
  return 0
}
trap 'disdl_on_signal USR1' USR1
trap 'disdl_on_signal TERM' TERM

# Run "$@" in the background so this shell can handle signals while it runs; return its status.
disdl_run_step() {
  "$@" &
  DISDL_STEP_PID=$!
  local rc again
  while :; do
    wait "$DISDL_STEP_PID"; rc=$?
    # wait returns >128 when a trapped signal interrupted it while the step still runs
    if (( rc > 128 )) && kill -0 "$DISDL_STEP_PID" 2>/dev/null; then continue; fi
    if (( rc > 128 )); then
      wait "$DISDL_STEP_PID" 2>/dev/null; again=$?
      (( again != 127 )) && rc=$again      # 127: already reaped, rc was the step's own
    fi
    break
  done
  DISDL_STEP_PID=""
  return "$rc"
}

# After the step: requeue on USR1 (the time-limit/preemption warning) if the step did not finish.
# REQUEUE=0 disables; MAX_REQUEUES (default 5) stops a job whose --time is too short to ever make
# progress from requeueing forever. The run exits non-zero when it stopped at a checkpoint.
disdl_maybe_requeue() {
  local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
  if [[ $DISDL_GOT_SIGNAL == USR1 && $rc != 0 && ${REQUEUE:-1} == 1 ]]; then
    if (( restarts >= ${MAX_REQUEUES:-5} )); then
      disdl_log "not requeueing: already restarted $restarts times (MAX_REQUEUES=${MAX_REQUEUES:-5}); raise --time"
      return 0
    fi
    disdl_log "step stopped by SIGUSR1 (rc=$rc): requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    disdl_log "scontrol requeue failed (job not requeueable? submit with --requeue)"
  fi
}
