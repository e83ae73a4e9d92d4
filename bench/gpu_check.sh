#!/usr/bin/env bash
# bench/gpu_check.sh [OUT]: the GPU path, run once on a real NVIDIA GPU, everything under OUT.
#
# Under 8 minutes on one GPU. Every step writes its output to OUT/<step>.txt (and JSON where the
# tool writes one) and its exit code to OUT/steps.tsv; a failing step does not stop the others.
# Without a GPU every GPU step is recorded as "skipped: no GPU" and the script exits 0, so it can
# be tried on any machine first.
#
# Steps: the doctor's report (1 rank, then 2 ranks with the allreduce self-test); the CUDA tests
# (pytest -m cuda); mpiexec -n 2 training on the one GPU (both ranks share it) for every scheme,
# host-staged (--cuda-aware no), CUDA-aware (Intel MPI's impi-rt wheel with I_MPI_OFFLOAD=1 in a
# prefix, or the default MPI when it says it is) and through NCCL (--comm nccl), each checked to
# give the host-staged path's models; bench.allreduce on GPU buffers per path (host-staged,
# CUDA-aware, NCCL) at 1 and 2 ranks; the every-scheme cost table (bench.norm_overhead) per path;
# bench.peer against DDP on NCCL at 1 and 2 ranks. Two NCCL ranks on the one GPU need NCCL >= 2.30
# with NCCL_MULTI_RANK_GPU_ENABLE=1 (and MPS, started when nvidia-cuda-mps-control exists): with
# an older NCCL in torch the script installs the nvidia-nccl-cu13 wheel and preloads its library.
#
# Settings: PYTHON [.venv/bin/python, else python3]  MPIEXEC [next to PYTHON, else on PATH]
#   EPOCHS [2]  STEP_TIMEOUT [240] seconds per step  IMPI [impi-rt==2021.16.1; empty: skip]
#   PREFIXES [OUT/prefixes]: where the Intel MPI and NCCL wheels are installed
# On a machine without network, bring the wheels the project needs in ./wheelhouse (pip
# download -d wheelhouse mpi4py mpich h5py tqdm ...): they are installed from there when missing.
# Where the image already has an mpi4py bound to another MPI, install mpi4py and mpich into a
# prefix and set MPI4PY_LIBMPI instead: docs/benchmarks/gpu/device_run.sh did that on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:-results/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
MPIEXEC=${MPIEXEC:-$(dirname "$PYTHON")/mpiexec}
[[ -x $MPIEXEC ]] || MPIEXEC=$(command -v mpiexec || echo mpiexec)
EPOCHS=${EPOCHS:-2}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
IMPI=${IMPI-impi-rt==2021.16.1}
PREFIXES=${PREFIXES:-$OUT/prefixes}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
printf 'step\texit\tseconds\n' > "$OUT/steps.tsv"

if [[ -d wheelhouse ]]; then
  "$PYTHON" -m pip install -q --no-index --find-links wheelhouse mpi4py mpich h5py tqdm scipy \
    scikit-learn matplotlib pytest pytest-timeout > "$OUT/install.txt" 2>&1 || true
fi

step() {  # step NAME CMD...: run CMD with a timeout, output to OUT/NAME.txt, record the exit
  local name=$1; shift
  local t0=$SECONDS rc
  echo "== $name: $*" | tee "$OUT/$name.txt"
  timeout "$STEP_TIMEOUT" "$@" >> "$OUT/$name.txt" 2>&1; rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  echo "   exit $rc in $((SECONDS - t0)) s"
  return $rc
}
skip() { printf '%s\tskipped: %s\t0\n' "$1" "$2" >> "$OUT/steps.tsv"; echo "== $1: skipped ($2)"; }

step doctor "$PYTHON" -m disdl_mpi.doctor --json "$OUT/doctor.json"
step doctor_2ranks "$MPIEXEC" -n 2 "$PYTHON" -m disdl_mpi.doctor --json "$OUT/doctor_2ranks.json"

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
aware=$("$PYTHON" -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["cuda_aware"]))' "$OUT/doctor.json" 2>/dev/null || echo 0)
echo "GPUs: $gpus; MPI CUDA-aware: $aware" | tee "$OUT/summary.txt"
GPU_STEPS=(cuda_tests install_impi doctor_impi install_nccl train_host_staged train_cuda_aware
  same_model_cuda_aware train_nccl same_model_nccl allreduce_1rank allreduce_host_staged
  allreduce_cuda_aware norm_overhead_host_staged norm_overhead_cuda_aware norm_overhead_nccl_1rank
  norm_overhead_nccl peer_1rank peer_2ranks)
if (( gpus == 0 )); then
  for s in "${GPU_STEPS[@]}"; do skip "$s" "no GPU"; done
  echo "no GPU: only the doctor ran; see $OUT" | tee -a "$OUT/summary.txt"
  exit 0
fi

step cuda_tests "$PYTHON" -m pytest -m cuda -rs -v tests

# --- Intel MPI (CUDA-aware with I_MPI_OFFLOAD=1) in a prefix; the venv's mpi4py loads it.
# Without a GPU (libcuda) I_MPI_OFFLOAD=1 makes Intel MPI 2021.16 crash in MPI_Init: GPU only.
IMPI_ENV=()
aware_impi=0
if [[ -z $IMPI ]]; then
  skip install_impi "IMPI is empty"; skip doctor_impi "no Intel MPI"
elif step install_impi "$PYTHON" -m pip install -q --no-deps --prefix "$PREFIXES/impi" "$IMPI"; then
  P=$PREFIXES/impi
  IMPI_ENV=(env I_MPI_ROOT="$P" MPI4PY_LIBMPI="$P/lib/libmpi.so.12"
    FI_PROVIDER_PATH="$P/lib/prov:$P/lib/libfabric" I_MPI_FABRICS=shm
    I_MPI_OFFLOAD=1 I_MPI_OFFLOAD_MODE=cuda I_MPI_OFFLOAD_CUDA_LIBRARY=libcuda.so.1)
  step doctor_impi "${IMPI_ENV[@]}" "$P/bin/mpiexec" -n 2 "$PYTHON" -m disdl_mpi.doctor \
    --json "$OUT/doctor_impi.json"
  aware_impi=$("$PYTHON" -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["cuda_aware"]))' \
    "$OUT/doctor_impi.json" 2>/dev/null || echo 0)
else
  skip doctor_impi "Intel MPI did not install (install_impi.txt)"
fi
echo "Intel MPI CUDA-aware: $aware_impi" | tee -a "$OUT/summary.txt"
# the CUDA-aware launcher: Intel MPI's when it says so, else the default MPI's when it does
if (( aware_impi == 1 )); then AWARE=("${IMPI_ENV[@]}" "$PREFIXES/impi/bin/mpiexec")
elif (( aware == 1 )); then AWARE=("$MPIEXEC")
else AWARE=(); fi

# --- NCCL: 2 ranks on one GPU need NCCL >= 2.30, NCCL_MULTI_RANK_GPU_ENABLE=1 and MPS
NCCL_VERSION='import torch; v = torch.cuda.nccl.version(); print(".".join(map(str, v)) if isinstance(v, tuple) else v)'
nccl=$("$PYTHON" -c "$NCCL_VERSION" 2>/dev/null || echo none)
if [[ $nccl != none ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(tuple(torch.cuda.nccl.version()[:2]) < (2, 30))' 2>/dev/null; then
  if step install_nccl "$PYTHON" -m pip install -q --no-deps --prefix "$PREFIXES/nccl" "nvidia-nccl-cu13>=2.30"; then
    lib=$(find "$PREFIXES/nccl" -name 'libnccl.so.2' | head -1)
    [[ -n $lib ]] && export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
  fi
else
  skip install_nccl "torch's NCCL is $nccl"
fi
export NCCL_MULTI_RANK_GPU_ENABLE=1
command -v nvidia-cuda-mps-control > /dev/null && nvidia-cuda-mps-control -d 2> /dev/null
echo "NCCL: torch built with $nccl, loaded $("$PYTHON" -c "$NCCL_VERSION" 2>&1)" | tee -a "$OUT/summary.txt"

# --- training on the one GPU (both ranks share cuda:0): a correctness and path check
train() {  # train NAME LAUNCHER... -- OPTIONS...
  local name=$1; shift; local launcher=()
  while [[ $1 != -- ]]; do launcher+=("$1"); shift; done; shift
  step "$name" "${launcher[@]}" -n 2 "$PYTHON" -m disdl_mpi.run --device cuda --norm all \
    --epochs "$EPOCHS" --save-model --progress lines --out "$OUT/$name" "$@"
}
same_model() {  # same_model NAME DIR_A DIR_B
  step "$1" "$PYTHON" - "$2" "$3" <<'EOF'
import sys
from pathlib import Path
import torch
a, b = map(Path, sys.argv[1:3])
bad = []
for model in sorted(a.glob("*/model.pt")):
    other = b / model.parent.name / "model.pt"
    x, y = torch.load(model, weights_only=True), torch.load(other, weights_only=True)
    diff = max(float((x[k].double() - y[k].double()).abs().max()) for k in x)
    print(f"{model.parent.name}: max |{a.name} - {b.name}| = {diff:.3g}")
    bad += [model.parent.name] if diff > 1e-5 else []
print("SAME MODEL on both paths" if not bad else f"DIFFERENT: {bad}")
sys.exit(1 if bad else 0)
EOF
}
train train_host_staged "$MPIEXEC" -- --comm mpi --cuda-aware no
if (( ${#AWARE[@]} )); then
  train train_cuda_aware "${AWARE[@]}" -- --comm mpi --cuda-aware yes
  same_model same_model_cuda_aware "$OUT/train_host_staged" "$OUT/train_cuda_aware"
else
  skip train_cuda_aware "no CUDA-aware MPI (doctor.json, doctor_impi.json)"
  skip same_model_cuda_aware "only the host-staged path could run"
fi
train train_nccl "$MPIEXEC" -- --comm nccl
same_model same_model_nccl "$OUT/train_host_staged" "$OUT/train_nccl"

# --- allreduce busbw per path, 4 KiB-256 MiB (mpi, disdl and nccl columns side by side)
AR=(-m bench.allreduce --device cuda --min-bytes 4K --max-bytes 256M --iters 20 --warmup 5)
step allreduce_1rank "$MPIEXEC" -n 1 "$PYTHON" "${AR[@]}" --json "$OUT/allreduce_1rank.json"
step allreduce_host_staged "$MPIEXEC" -n 2 "$PYTHON" "${AR[@]}" --cuda-aware no \
  --json "$OUT/allreduce_host_staged.json"
if (( ${#AWARE[@]} )); then
  step allreduce_cuda_aware "${AWARE[@]}" -n 2 "$PYTHON" "${AR[@]}" --backends mpi,disdl --cuda-aware yes \
    --json "$OUT/allreduce_cuda_aware.json"
else
  skip allreduce_cuda_aware "no CUDA-aware MPI"
fi

# --- every scheme's cost per path
NO=(-m bench.norm_overhead --device cuda --models cnn,resnet20 --steps 30 --warmup 5)
step norm_overhead_host_staged "$MPIEXEC" -n 2 "$PYTHON" "${NO[@]}" --cuda-aware no \
  --json "$OUT/norm_overhead_host_staged.json"
if (( ${#AWARE[@]} )); then
  step norm_overhead_cuda_aware "${AWARE[@]}" -n 2 "$PYTHON" "${NO[@]}" --cuda-aware yes \
    --json "$OUT/norm_overhead_cuda_aware.json"
else
  skip norm_overhead_cuda_aware "no CUDA-aware MPI"
fi
step norm_overhead_nccl_1rank "$MPIEXEC" -n 1 "$PYTHON" "${NO[@]}" --comm nccl \
  --json "$OUT/norm_overhead_nccl_1rank.json"
step norm_overhead_nccl "$MPIEXEC" -n 2 "$PYTHON" "${NO[@]}" --comm nccl --json "$OUT/norm_overhead_nccl.json"

# --- our step against DDP on NCCL
PEER=(-m bench.peer --device cuda --model resnet20 --dataset synthetic --sample-shape 3,32,32
  --steps 40 --rounds 4)
step peer_1rank "$MPIEXEC" -n 1 "$PYTHON" "${PEER[@]}" --json "$OUT/peer_1rank.json"
step peer_2ranks "$MPIEXEC" -n 2 "$PYTHON" "${PEER[@]}" --json "$OUT/peer_2ranks.json"
command -v nvidia-cuda-mps-control > /dev/null && echo quit | nvidia-cuda-mps-control 2> /dev/null
echo "done: $OUT (steps.tsv lists every step and its exit code)" | tee -a "$OUT/summary.txt"
