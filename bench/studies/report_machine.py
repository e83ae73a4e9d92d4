"""The report's machine table, from the ``machine`` dict a run records."""

from __future__ import annotations

from typing import Any

# (label, key in the run's ``machine`` dict), in the order the report lists them
MACHINE_FIELDS = (
    ("CPU", "cpu_model"),
    ("CPU architecture", "cpu"),
    ("cores per node", "cores_per_node"),
    ("device (GPU model)", "device"),
    ("MPI library", "mpi_library"),
    ("mpi4py", "mpi4py"),
    ("torch", "torch"),
    ("python", "python"),
    ("nodes", "nodes"),
    ("ranks per node", "ranks_per_node"),
    ("threads per rank", "threads_per_rank"),
    ("world size", "world_size"),
    ("hostname", "hostname"),
    ("disdl-mpi", "disdl_mpi"),
)


def machine_rows(machine: dict[str, Any], paths: set[str], source: str) -> list[tuple[str, str]]:
    """Label/value rows for the report; ``paths`` are the gradient allreduce paths seen."""
    rows = [(label, str(machine[key])) for label, key in MACHINE_FIELDS if machine.get(key) not in (None, "")]
    cuda = (
        "yes (CUDA-aware MPI)"
        if "cuda-aware" in paths
        else (
            "no, host-staged"
            if "host-staged" in paths
            else "no (CPU tensors, zero-copy)"
            if paths
            else "unknown"
        )
    )
    rows.append(("gradient allreduce path", ", ".join(sorted(paths)) or "unknown"))
    rows.append(("CUDA-aware MPI used", cuda))
    rows.append(("machine info from", source))
    return rows
