#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/mpich .whl/mpi4py-*.whl .whl/mpich-*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/mpich/lib/python3.12/site-packages:$PWD MPI4PY_LIBMPI=/tmp/mpich/lib/libmpi.so.12
X=/tmp/mpich/bin/mpiexec
F='suspicious MPI\|Your environment has\|You may be using\|^<frozen'
{
echo "== without MPS, 2 ranks"
$X -n 2 python3 -m bench.allreduce --device cuda -b 4K -e 256K -f 4 --iters 40 --warmup 10 --backends mpi,disdl
which nvidia-cuda-mps-control && { export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog; mkdir -p /tmp/mps /tmp/mpslog; nvidia-cuda-mps-control -d && echo "MPS started"; }
echo "== with MPS, 2 ranks"
$X -n 2 python3 -m bench.allreduce --device cuda -b 4K -e 256K -f 4 --iters 40 --warmup 10 --backends mpi,disdl
echo "== with MPS, syncbn vs bn"
$X -n 2 python3 -m bench.norm_overhead --device cuda --models cnn,resnet20 --steps 30 --warmup 5
echo quit | nvidia-cuda-mps-control
} 2>&1 | grep -v "$F" | tee ${OUT:-/tmp}/mps.txt
