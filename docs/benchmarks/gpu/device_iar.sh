#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/mpich .whl/mpi4py-*.whl .whl/mpich-*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/mpich/lib/python3.12/site-packages:$PWD MPI4PY_LIBMPI=/tmp/mpich/lib/libmpi.so.12
/tmp/mpich/bin/mpiexec -n 2 python3 .whl/iar2.py 2>&1 | grep -v "suspicious MPI\|Your environment has\|You may be using\|^<frozen" | tee ${OUT:-/tmp}/iar2.txt
