#!/usr/bin/env bash
# Is the host-staged 4 KiB cost a cold GPU? Same benchmark cold, then warm.
set -u
O=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/mpich .whl/mpi4py-*.whl .whl/mpich-*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/mpich/lib/python3.12/site-packages:$PWD MPI4PY_LIBMPI=/tmp/mpich/lib/libmpi.so.12
X=/tmp/mpich/bin/mpiexec
clk() { nvidia-smi --query-gpu=clocks.sm,clocks.mem,pstate --format=csv,noheader; }
{
echo "clocks idle: $(clk)"
echo "== cold: 4K..64K"
$X -n 2 python3 -m bench.allreduce --device cuda -b 4K -e 64K -f 4 --iters 20 --warmup 5 --backends mpi,disdl
echo "clocks after: $(clk)"
echo "== again, at once: 4K..64K"
$X -n 2 python3 -m bench.allreduce --device cuda -b 4K -e 64K -f 4 --iters 20 --warmup 5 --backends mpi,disdl
echo "== one rank, 4K..64K (no MPI traffic; copies, syncs and Python only)"
$X -n 1 python3 -m bench.allreduce --device cuda -b 4K -e 64K -f 4 --iters 50 --warmup 10 --backends mpi,disdl
echo "== 2 ranks, 4K..64M, 50 iterations, reverse check of the ladder: warm-up by a 64M run first"
$X -n 2 python3 -m bench.allreduce --device cuda -b 64M -e 64M --iters 5 --warmup 2 --backends disdl > /dev/null
$X -n 2 python3 -m bench.allreduce --device cuda -b 4K -e 64M -f 4 --iters 50 --warmup 10 --backends mpi,disdl --json $O/allreduce_gpu_warm.json
echo "clocks end: $(clk)"
} 2>&1 | grep -v "suspicious MPI\|Your environment has\|You may be using\|^<frozen" | tee $O/warm.txt
