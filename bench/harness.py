"""Benchmarks run under mpiexec: ``python -m bench.allreduce``, ``python -m bench.peer``.

Shared helpers: starting torch.distributed (gloo/nccl) next to MPI, and leaving it without
gloo's occasional abort at interpreter exit.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Optional

from mpi4py import MPI


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_torch_distributed(comm: MPI.Comm, backend: str = "gloo", timeout_s: float = 120.0) -> None:
    """Start a torch.distributed group matching ``comm``'s ranks.

    Rank 0 picks a free port and broadcasts it (with its address) over MPI, so no fixed port can
    collide with another job. One node: 127.0.0.1; several nodes: rank 0's hostname, unless the
    user set MASTER_ADDR.
    """
    import datetime

    import torch.distributed as dist

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_node = local.Get_size() == comm.Get_size()
    local.Free()
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if one_node else socket.gethostname())
        info = (addr, free_port())
    else:
        info = None
    addr, port = comm.bcast(info, root=0)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=comm.Get_rank(),
                            world_size=comm.Get_size(),
                            timeout=datetime.timedelta(seconds=timeout_s))


def exit_cleanly(comm: MPI.Comm, code: int = 0) -> None:
    """Leave without gloo's 'terminate called without an active exception' abort.

    A barrier, then destroy_process_group, then ``os._exit`` (skipping the interpreter teardown
    where gloo's threads abort); MPI is finalized by hand since atexit handlers will not run.
    """
    import torch.distributed as dist

    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    comm.Barrier()
    sys.stdout.flush()
    MPI.Finalize()
    os._exit(code)


def parse_list(text: str, allowed: Optional[tuple[str, ...]] = None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise SystemExit(f"unknown choice(s) {', '.join(bad)}; pick from {', '.join(allowed)}")
    return items
