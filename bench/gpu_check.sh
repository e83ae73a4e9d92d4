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
# once host-staged (--cuda-aware no) and once CUDA-aware (--cuda-aware yes, only when MPI says it
# is), with a check that the two paths give the same model; bench.allreduce on GPU buffers
# (with NCCL when torch has it); bench.peer against DDP with NCCL; syncbn against bn step time.
#
# Settings: PYTHON [.venv/bin/python, else python3]  MPIEXEC [next to PYTHON, else on PATH]
#   EPOCHS [3]  STEP_TIMEOUT [300] seconds per step
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
EPOCHS=${EPOCHS:-3}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
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
if (( gpus == 0 )); then
  for s in cuda_tests train_host_staged train_cuda_aware same_model allreduce_gpu peer_nccl norm_overhead_gpu; do
    skip "$s" "no GPU"
  done
  echo "no GPU: only the doctor ran; see $OUT" | tee -a "$OUT/summary.txt"
  exit 0
fi

step cuda_tests "$PYTHON" -m pytest -m cuda -rs -v tests
# Both ranks share the one GPU (cuda:0): a correctness and path check, not a scaling figure.
train() {  # train NAME CUDA_AWARE
  step "$1" "$MPIEXEC" -n 2 "$PYTHON" -m disdl_mpi.run --device cuda --cuda-aware "$2" \
    --norm all --epochs "$EPOCHS" --save-model --progress lines --out "$OUT/$1"
}
train train_host_staged no
if (( aware == 1 )); then
  train train_cuda_aware yes
  step same_model "$PYTHON" - "$OUT/train_host_staged" "$OUT/train_cuda_aware" <<'EOF'
import sys
from pathlib import Path
import torch
a, b = map(Path, sys.argv[1:3])
bad = []
for model in sorted(a.glob("*/model.pt")):
    other = b / model.parent.name / "model.pt"
    x, y = torch.load(model, weights_only=True), torch.load(other, weights_only=True)
    diff = max(float((x[k].double() - y[k].double()).abs().max()) for k in x)
    print(f"{model.parent.name}: max |host-staged - cuda-aware| = {diff:.3g}")
    bad += [model.parent.name] if diff > 1e-5 else []
print("SAME MODEL on both paths" if not bad else f"DIFFERENT: {bad}")
sys.exit(1 if bad else 0)
EOF
else
  skip train_cuda_aware "MPI is not CUDA-aware (doctor.json: cuda_aware_reason)"
  skip same_model "only the host-staged path could run"
fi
step allreduce_gpu "$MPIEXEC" -n 2 "$PYTHON" -m bench.allreduce --device cuda \
  --min-bytes 4K --max-bytes 64M --iters 20 --warmup 5 --json "$OUT/allreduce_gpu.json"
step peer_nccl "$MPIEXEC" -n 2 "$PYTHON" -m bench.peer --device cuda --model resnet20 \
  --dataset synthetic --sample-shape 3,32,32 --steps 40 --rounds 4 --json "$OUT/peer_nccl.json"
step norm_overhead_gpu "$MPIEXEC" -n 2 "$PYTHON" -m bench.norm_overhead --device cuda \
  --models cnn,resnet20 --steps 30 --warmup 5 --json "$OUT/norm_overhead_gpu.json"
echo "done: $OUT (steps.tsv lists every step and its exit code)" | tee -a "$OUT/summary.txt"
