"""Per-rank device, thread count and seeds."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from disdl_mpi.comm.world import RankInfo
from disdl_mpi.errors import UserError


def select_device(requested: str, info: RankInfo) -> torch.device:
    """One CUDA device per node-local rank when CUDA is there, the CPU otherwise."""
    if requested == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if requested.startswith("cuda") and not has_cuda:
        raise UserError(
            f"--device {requested} asked for, but torch sees no CUDA device "
            f"(rank {info.rank} on {info.hostname})",
            collective=True,
        )
    if has_cuda and requested in ("auto", "cuda"):
        index = info.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if requested.startswith("cuda:"):
        dev = torch.device(requested)
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def node_cores() -> int:
    """Cores usable on this node (the affinity mask, not the hardware count, where it exists)."""
    try:
        return len(os.sched_getaffinity(0)) or os.cpu_count() or 1
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def set_threads(requested: int | None, info: RankInfo) -> int:
    """Torch intra-op threads per rank: cores on the node shared among the local ranks.

    Under mpiexec torch starts with one thread (MKL's MPI detection), and oversubscribing cores
    with threads of several ranks is worse than either extreme, so it is set deliberately.
    """
    threads = requested if requested and requested > 0 else max(1, node_cores() // info.local_size)
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"
    return "cpu"
