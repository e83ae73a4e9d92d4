"""--check-collectives in one process: signatures, buffer descriptions, results unchanged.

(The mismatch between ranks is tested under mpiexec in test_reliability_faults.py.)"""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from disdl_mpi.comm.collective_check import CheckedComm, CollectiveChecker, describe_buffer


def test_buffers_are_described_by_shape_and_dtype():
    assert describe_buffer(np.zeros((3, 2), np.float32)) == "(3, 2) float32"
    assert describe_buffer(torch.zeros(4, dtype=torch.float64)) == "(4,) float64"
    assert describe_buffer(MPI.IN_PLACE) == "-" and describe_buffer(None) == "-"
    assert describe_buffer([np.zeros(5, np.int64), MPI.INT64_T]) == "(5,) int64"
    assert describe_buffer(bytearray(12)) == "12 bytes"


def test_checked_calls_are_counted_and_give_the_same_results():
    checker = CollectiveChecker(MPI.COMM_SELF)
    comm = CheckedComm(MPI.COMM_SELF, checker)
    buf = np.arange(4, dtype=np.float32)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    assert np.array_equal(buf, np.arange(4, dtype=np.float32))
    assert comm.allreduce(3) == 3 and comm.bcast("x", root=0) == "x"
    comm.Barrier()
    assert checker.calls == 4
    assert comm.Get_size() == 1  # everything else passes through to the communicator
