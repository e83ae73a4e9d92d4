"""The machine a result was measured on, as recorded in summary.json's ``machine``."""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import mpi4py
import torch

from disdl_mpi import __version__
from disdl_mpi.comm.world import RankInfo, mpi_library
from disdl_mpi.device import describe_device


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else the platform's description."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def machine_info(info: RankInfo, device: torch.device, threads: int, cuda_awareness: str) -> dict[str, Any]:
    """The machine dict of summary.json (every rank's hostname included)."""
    return {
        "world_size": info.world_size,
        "ranks_per_node": info.local_size,
        "nodes": info.nodes,
        "hostname": info.hostname,
        "hostnames": list(info.hostnames),
        "cpu": platform.processor() or platform.machine(),
        "cores_per_node": os.cpu_count(),
        "cpu_model": cpu_model(),
        "device": describe_device(device),
        "mpi_library": mpi_library(),
        "cuda_aware_mpi": cuda_awareness,
        "mpi4py": mpi4py.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads_per_rank": threads,
        # an MPICH allreduce algorithm selection, when one was given (bench.cluster does)
        "allreduce_selection": os.environ.get("DISDL_ALLREDUCE_SELECTION", "MPI default"),
        "cluster": os.environ.get("DISDL_CLUSTER"),
        "disdl_mpi": __version__,
    }
