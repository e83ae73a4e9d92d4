"""Keep model copies identical across ranks: broadcast of parameters and buffers."""

from __future__ import annotations

from typing import Iterable

import torch
from mpi4py import MPI


def broadcast_tensors_(tensors: Iterable[torch.Tensor], comm: MPI.Comm, root: int = 0) -> None:
    """Overwrite every tensor with root's copy (CPU: in place; CUDA: staged through host)."""
    if comm.Get_size() == 1:
        return
    for t in tensors:
        data = t.detach()
        if data.is_cuda or not data.is_contiguous():
            host = data.cpu().contiguous()
            comm.Bcast(host.numpy(), root=root)
            data.copy_(host)
        else:
            comm.Bcast(data.numpy(), root=root)


def broadcast_module_(
    model: torch.nn.Module,
    comm: MPI.Comm,
    *,
    buffers_only: bool = False,
    exclude: set[int] | None = None,
    root: int = 0,
) -> None:
    """Broadcast parameters (unless ``buffers_only``) and floating buffers from ``root``.

    ``exclude`` holds ids of tensors that stay rank-local (fedbn's normalization state).
    """
    exclude = exclude or set()
    tensors = [] if buffers_only else [p for p in model.parameters() if id(p) not in exclude]
    tensors += [b for b in model.buffers() if id(b) not in exclude]
    broadcast_tensors_(tensors, comm, root)
