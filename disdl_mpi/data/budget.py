"""How much of a partition a rank may hold resident, checked before anything large is read.

Without this check an oversized partition ends with the kernel's OOM kill ("Killed (signal 9)")
on one rank, after minutes of loading. With it, every rank refuses up front with the sizes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from disdl_mpi.units import parse_size

# A resident run may use this share of the memory available to the ranks of a node (or GPU):
# the rest is the interpreter, torch, MPI buffers, activations and the batch being converted.
SAFE_SHARE = 0.7


def human_size(n: float) -> str:
    """A size for people: KiB, MiB or GiB, whichever reads best."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):,.1f} {unit}"
    return f"{n / 1024:,.0f} KiB"


def _host_available() -> int:
    """MemAvailable, lowered to what a cgroup (a SLURM job's, a container's) still allows."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, avail)


def default_budget(device: torch.device, ranks_sharing: int) -> tuple[int, str]:
    """(bytes per rank, how it was derived): a safe share of the device's or the node's memory
    divided among the ranks that share it."""
    ranks_sharing = max(1, ranks_sharing)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        where, avail = f"{device} free memory", free
    else:
        where, avail = "the node's available memory", _host_available()
    budget = int(avail * SAFE_SHARE / ranks_sharing)
    return budget, (f"{SAFE_SHARE:.0%} of {where} ({human_size(avail)}) over the "
                    f"{ranks_sharing} rank(s) sharing it")


def resident_bytes(manifest: dict, rank: int) -> int:
    """Bytes a rank holds resident, in the stored dtype: its partition, the test set and its
    own-domain test split (feature shift)."""
    per_sample = int(np.prod(manifest["sample_shape"], dtype=np.int64)) * \
        np.dtype(manifest["x_dtype"]).itemsize + 8  # + the int64 label
    samples = int(manifest["ranks"][rank]["size"]) + int(manifest["test"]["size"])
    if manifest.get("domain_tests") is not None:
        samples += int(manifest["domain_tests"][rank]["size"])
    return samples * per_sample


def over_budget(data_dir: Path, manifest: dict, budget: int, how: str) -> Optional[str]:
    """The refusal message when some rank's resident data exceeds ``budget``, else None.

    Every rank computes it alike from the manifest, so all refuse together without a message.
    """
    need = [resident_bytes(manifest, r) for r in range(len(manifest["ranks"]))]
    over = [r for r, n in enumerate(need) if n > budget]
    if not over:
        return None
    worst = max(over, key=lambda r: need[r])
    ranks = ",".join(map(str, over[:8])) + (",..." if len(over) > 8 else "")
    enough = max(1, -(-need[worst] // (1 << 30)))  # GiB, rounded up
    return (f"{data_dir}: rank(s) {ranks} would hold their data resident over the memory "
            f"budget: rank {worst} needs {human_size(need[worst])} (partition, test set and "
            f"labels in the stored dtype {manifest['x_dtype']}), the budget is "
            f"{human_size(budget)} per rank ({how}). Stream it from disk instead "
            f"(--data-residency stream, or auto), partition the data over more ranks, or "
            f"pass --memory-budget SIZE (e.g. {enough}G) if the memory is there.")


def agreed_budget(comm, device: torch.device, hostnames: Sequence[str],
                  explicit: Optional[str]) -> tuple[int, str]:
    """The per-rank budget every rank applies: ``--memory-budget`` when given, else the
    smallest default over the ranks (nodes differ), so all ranks decide alike."""
    if explicit is not None:
        return parse_size(explicit, "--memory-budget"), "--memory-budget"
    sharing = hostnames.count(hostnames[comm.Get_rank()])
    if device.type == "cuda":
        sharing = -(-sharing // max(1, torch.cuda.device_count()))
    return min(comm.allgather(default_budget(device, sharing)))
