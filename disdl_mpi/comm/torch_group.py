"""A torch.distributed process group (gloo, NCCL) bootstrapped from MPI: MPI for control, the
group for data (Horovod's split). Ranks and world come from the MPI communicator, the address
from :mod:`disdl_mpi.comm.rendezvous`, a free port from rank 0 by broadcast."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from typing import Any

import torch
from mpi4py import MPI

from disdl_mpi.comm.rendezvous import interface_towards, reachable_address

COMM_PATHS = ("mpi", "gloo", "nccl")
# NCCL 2.30 admits several ranks on one GPU when this is set (experimental, with MPS)
MULTI_RANK_VAR = "NCCL_MULTI_RANK_GPU_ENABLE"
MULTI_RANK_NCCL = (2, 30)


def over_torch(path: str) -> bool:
    """Whether the data path ``path`` (--comm, resolved) is a torch.distributed group."""
    return path in ("gloo", "nccl")


def free_port() -> int:
    """A TCP port that was free a moment ago on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_process_group(comm: MPI.Comm, backend: str = "gloo", timeout_s: float = 120.0) -> None:
    """Collective: start torch.distributed's default group with ``comm``'s ranks and world.

    Rank 0 picks a free port and broadcasts it over MPI, so no fixed port can collide with
    another job; the address is one every rank reached (127.0.0.1 on one node, else rank 0's
    interface addresses or hostname, or MASTER_ADDR).
    """
    import torch.distributed as dist

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_node = local.Get_size() == comm.Get_size()
    local.Free()
    addr = reachable_address(comm, one_node=one_node)
    if not one_node:  # the ranks' direct connections, not only the store, must leave by it
        ifname = interface_towards(addr)
        if ifname is not None:
            for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                os.environ.setdefault(var, ifname)
    port = comm.bcast(free_port() if comm.Get_rank() == 0 else None, root=0)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def stop_process_group() -> None:
    """Destroy the default group if one is running (a barrier first, so no rank leaves early)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def nccl_version() -> tuple[int, ...] | None:
    """The NCCL torch was built with, as a tuple, or None without CUDA NCCL."""
    try:
        v = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return tuple(v) if isinstance(v, tuple) else (v // 1000, v // 100 % 10, v % 100)


def nccl_usable(comm: MPI.Comm, environ: dict | None = None) -> tuple[bool, str]:
    """Whether NCCL can join these ranks, and why not.

    NCCL wants one GPU per rank: older NCCL refuses ranks that share a GPU ("duplicate GPU",
    "invalid usage"); NCCL 2.30 and later admit them when NCCL_MULTI_RANK_GPU_ENABLE=1
    (experimental; with MPS).
    """
    import torch.distributed as dist

    env = os.environ if environ is None else environ
    if not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()):
        return False, "torch has no CUDA NCCL here"
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    ranks = local.Get_size()
    local.Free()
    gpus = torch.cuda.device_count()
    return nccl_admits(ranks, gpus, nccl_version(), env.get(MULTI_RANK_VAR) == "1")


def resolve_comm(choice: str, device: torch.device, comm: MPI.Comm) -> tuple[str, str]:
    """Collective: the data path for ``--comm CHOICE`` on ``device``, and why.

    auto is mpi on CPU; on a GPU nccl where NCCL admits these ranks (the doctor's verdict),
    else mpi (host-staged or CUDA-aware). nccl that NCCL refuses raises UserError on every rank.
    """
    from disdl_mpi.errors import UserError

    if choice in ("mpi", "gloo"):
        return choice, "as asked"
    if device.type != "cuda":
        if choice == "nccl":
            raise UserError("--comm nccl needs a CUDA device; on CPU use mpi or gloo", collective=True)
        return "mpi", "CPU: MPI reads the tensors in place"
    usable, why = nccl_usable(comm)
    usable = bool(comm.allreduce(int(usable), op=MPI.MIN))
    if choice == "nccl" and not usable:
        raise UserError(
            f"--comm nccl: NCCL cannot join these ranks: {why or 'not on every rank'}", collective=True
        )
    if usable:
        return "nccl", why or "NCCL admits one rank per GPU"
    return "mpi", f"NCCL not usable ({why or 'not on every rank'})"


def nccl_admits(ranks: int, gpus: int, version: tuple[int, ...] | None, multi_rank: bool) -> tuple[bool, str]:
    """The rule of :func:`nccl_usable`, apart from the machine (tested on its own)."""
    if ranks <= gpus:
        return True, ""
    shared = f"{ranks} ranks share {gpus} GPU(s) on a node"
    have = ".".join(map(str, version or ())) or "unknown"
    if version is not None and tuple(version[:2]) >= MULTI_RANK_NCCL:
        if multi_rank:
            return True, f"{shared}: admitted by NCCL {have} with {MULTI_RANK_VAR}=1"
        return False, f"{shared}; NCCL {have} admits that with {MULTI_RANK_VAR}=1 (experimental, with MPS)"
    return False, f"{shared}, and NCCL {have} needs one GPU per rank (2.30+ with {MULTI_RANK_VAR}=1 does not)"


class TorchWork:
    """A torch.distributed work handle with the two methods of an MPI request used here.

    On CUDA (``timed``) a pair of CUDA events brackets it on the current stream: the start
    recorded before the collective is enqueued, the end after :meth:`Wait` made the stream wait
    for it; :meth:`seconds` is their distance once the stream has passed the end (NCCL's
    completion is in stream order, so host clocks would time the enqueueing only).
    """

    __slots__ = ("work", "events")

    def __init__(self, launch: Any, timed: bool = False) -> None:
        self.events = None
        if timed:
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.work = launch()

    def Test(self) -> bool:  # noqa: N802 - MPI's spelling, so the step loop takes either
        return self.work.is_completed()

    def Wait(self) -> None:  # noqa: N802
        self.work.wait()  # NCCL: the current stream waits; gloo: the host waits
        if self.events is not None:
            self.events[1].record()

    def seconds(self) -> float | None:
        """GPU seconds from enqueueing to completion (after a synchronize), else None."""
        if self.events is None:
            return None
        return self.events[0].elapsed_time(self.events[1]) / 1e3


def flush_and_stop(comm: MPI.Comm) -> None:
    """Stop the group and MPI in the order that avoids gloo's abort at interpreter exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    stop_process_group()
    comm.Barrier()
