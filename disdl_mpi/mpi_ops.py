"""Collectives on torch tensors through mpi4py (zero-copy on CPU, staged or CUDA-aware on GPU)."""
from __future__ import annotations

import torch
from mpi4py import MPI

_MPI_DTYPES = (torch.float16, torch.float32, torch.float64, torch.int32, torch.int64)


def allreduce_(t: torch.Tensor, comm: MPI.Comm, op: MPI.Op = MPI.SUM) -> torch.Tensor:
    """In-place allreduce of a tensor over ``comm``; returns ``t``.

    bfloat16 has no MPI reduction op, so it travels as float32.
    """
    if comm.Get_size() == 1:
        return t
    work = t.detach()
    if not work.is_cuda and work.dtype in _MPI_DTYPES and work.is_contiguous():
        comm.Allreduce(MPI.IN_PLACE, work.numpy(), op=op)  # zero-copy view
        return t
    # Host staging: CUDA tensors (the CUDA-aware fast path lives in the gradient allreducer),
    # non-contiguous tensors and dtypes MPI cannot reduce.
    dtype = work.dtype if work.dtype in _MPI_DTYPES else torch.float32
    host = work.to("cpu", dtype).contiguous()
    comm.Allreduce(MPI.IN_PLACE, host.numpy(), op=op)
    work.copy_(host)
    return t
