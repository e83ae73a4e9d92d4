#!/bin/bash
# slurm/launch.sh N [--] CMD ARGS...
#
# Start CMD as N MPI ranks inside the current SLURM allocation, packed onto as few nodes as the
# allocation's tasks-per-node allows (ranks 1..ppn on one node, then two nodes, ...). Used by
# train.sbatch directly and by the sweep drivers through DISDL_LAUNCHER="slurm/launch.sh {n}".
#
# Settings (environment, with defaults):
#   LAUNCHER=srun      srun | mpirun | mpiexec  (mpirun/mpiexec: the MPI's own launcher, run
#                      inside the allocation; Open MPI and MPICH/Hydra both read SLURM's nodes)
#   MPI_PLUGIN=pmi2    srun --mpi=...: pmi2 (works with MPICH and most MPIs), pmix (Open MPI 5,
#                      recent MPICH builds with PMIx), cray_shasta, ... see `srun --mpi=list`
#   CPU_BIND=cores     srun --cpu-bind=... (empty: leave it to the site default)
#   GPU_BIND=          srun --gpu-bind=... (empty: every rank sees all GPUs of its node and
#                      disdl_mpi picks cuda:<local rank>; keeps CUDA IPC between GPUs possible)
#   SRUN_ARGS=         extra srun options;  MPIRUN=mpirun, MPIRUN_ARGS= for the mpirun launcher
#   DRY_RUN=0          1: print the command line and exit 0 without starting anything
set -euo pipefail

die() { echo "launch.sh: error: $*" >&2; exit 2; }

n=${1:-}
[[ $n =~ ^[1-9][0-9]*$ ]] || die "first argument must be the rank count (a positive integer), got '${n}'"
shift
[[ ${1:-} == -- ]] && shift
(( $# > 0 )) || die "no command to launch after the rank count"

total=${SLURM_NTASKS:-${SLURM_NPROCS:-}}
[[ -n $total ]] || die "not inside a SLURM allocation with tasks (SLURM_NTASKS is unset); submit with sbatch/salloc"
(( n <= total )) || die "asked for $n ranks but the allocation (job ${SLURM_JOB_ID:-?}) has only $total tasks"
nodes_alloc=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
ppn=$(( (total + nodes_alloc - 1) / nodes_alloc ))   # ranks per node in this allocation
nodes=$(( (n + ppn - 1) / ppn ))
(( nodes > nodes_alloc )) && nodes=$nodes_alloc
cpt=${SLURM_CPUS_PER_TASK:-1}

LAUNCHER=${LAUNCHER:-srun}
case $LAUNCHER in
  srun)
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: pass it explicitly.
    cmd=(srun "--mpi=${MPI_PLUGIN:-pmi2}" --nodes="$nodes" --ntasks="$n" --cpus-per-task="$cpt"
         --distribution=block --kill-on-bad-exit=1)
    [[ -n ${CPU_BIND-cores} ]] && cmd+=("--cpu-bind=${CPU_BIND-cores}")
    [[ -n ${GPU_BIND:-} ]] && cmd+=("--gpu-bind=${GPU_BIND}")
    # shellcheck disable=SC2206  # SRUN_ARGS is a user-provided word list on purpose
    cmd+=(${SRUN_ARGS:-})
    ;;
  mpirun|mpiexec)
    mpirun_bin=${MPIRUN:-$LAUNCHER}
    command -v "$mpirun_bin" >/dev/null || die "LAUNCHER=$LAUNCHER but '$mpirun_bin' is not on PATH (set MPIRUN or load the MPI module)"
    version=$("$mpirun_bin" --version 2>&1 || true)
    per_node=$(( (n + nodes - 1) / nodes ))
    if [[ $version == *"Open MPI"* || $version == *"OpenRTE"* || $version == *"PRRTE"* ]]; then
      # Open MPI: ppn ranks per node, each bound to its cpus-per-task cores
      cmd=("$mpirun_bin" -n "$n" --map-by "ppr:${per_node}:node:PE=${cpt}" --bind-to core)
    elif [[ $version == *HYDRA* ]]; then
      # MPICH/Intel MPI Hydra: takes the node list from SLURM itself
      cmd=("$mpirun_bin" -n "$n" -ppn "$per_node" -bind-to "core:${cpt}")
    else
      cmd=("$mpirun_bin" -n "$n")
    fi
    # shellcheck disable=SC2206
    cmd+=(${MPIRUN_ARGS:-})
    ;;
  *) die "LAUNCHER must be srun, mpirun or mpiexec, got '$LAUNCHER'" ;;
esac

cmd+=("$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
# exec: the caller's pid IS the launcher, so signals sent to it reach srun/mpirun directly,
# and both forward SIGUSR1/SIGTERM to every rank.
exec "${cmd[@]}"
