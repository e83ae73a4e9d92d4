"""``python -m disdl_mpi.doctor``: can this installation run the toolkit, and how?

Like ``horovodrun --check-build``: the MPI library and version, the thread level, whether MPI is
CUDA-aware and why that verdict, torch's build and devices, h5py and HDF5, ranks per node, and,
when launched under ``mpiexec -n 2`` (or more), an allreduce self-test on every rank. It ends
with one line: whether the toolkit can run here and on which path (CPU, CUDA-aware,
host-staged). Only rank 0 prints; ``--json FILE`` writes the same facts. Exit code 0 when the
installation can run the toolkit, 1 when it cannot.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Optional

from disdl_mpi.options import program_parser


def facts(comm) -> dict[str, Any]:
    """Everything this rank can tell about the installation (cheap, no collectives)."""
    import h5py
    import mpi4py
    import torch
    from mpi4py import MPI

    from disdl_mpi import __version__
    from disdl_mpi.comm.cuda_aware import detect, explain, mpi_family
    from disdl_mpi.comm.torch_group import nccl_version
    from disdl_mpi.comm.world import mpi_library

    levels = {
        MPI.THREAD_SINGLE: "single",
        MPI.THREAD_FUNNELED: "funneled",
        MPI.THREAD_SERIALIZED: "serialized",
        MPI.THREAD_MULTIPLE: "multiple",
    }
    aware = detect("auto")
    cuda = torch.cuda.is_available()
    return {
        "disdl_mpi": __version__,
        "python": platform.python_version(),
        "mpi_library": mpi_library(),
        "mpi_family": mpi_family(mpi_library()),
        "mpi_version": "%d.%d" % MPI.Get_version(),
        "mpi4py": mpi4py.__version__,
        "thread_level": levels.get(MPI.Query_thread(), "?"),
        "cuda_aware": aware.aware,
        "cuda_aware_reason": aware.reason,
        "cuda_aware_verdict": explain(aware, mpi_library()),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "nccl": bool(cuda and torch.distributed.is_available() and torch.distributed.is_nccl_available()),
        "nccl_version": ".".join(map(str, nccl_version() or ())) or None,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "world_size": comm.Get_size(),
    }


# Rank counts that launchers export: MPICH's hydra and srun (PMI), Open MPI, PMIx. Not
# SLURM_NTASKS: a batch script sees it while running a single process on purpose.
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")


def launcher_size(env=os.environ) -> Optional[int]:
    """The rank count the launcher announced, or None when no launcher said."""
    for var in LAUNCHER_SIZE_VARS:
        if env.get(var, "").isdigit():
            return int(env[var])
    return None


def self_test(comm, device: str) -> Optional[str]:
    """Collective: an allreduce of known values on ``device`` through the gradient path;
    None when every rank got the exact sum, else what went wrong."""
    import torch
    from torch import nn

    from disdl_mpi.comm.allreducer import GradientAllreducer

    n, r = comm.Get_size(), comm.Get_rank()
    model = nn.Linear(64, 16).to(device)
    reducer = GradientAllreducer(model, comm)
    for i, p in enumerate(model.parameters()):
        p.grad.copy_(torch.full_like(p, float(r + 1 + i)))
    reducer.begin_step(1.0)
    for p in model.parameters():
        reducer.grad_ready(p)
    reducer.finish_step()
    reducer.close()
    want = [sum(k + 1 + i for k in range(n)) for i, _ in enumerate(model.parameters())]
    bad = [
        i
        for i, p in enumerate(model.parameters())
        if not torch.equal(p.grad, torch.full_like(p, float(want[i])))
    ]
    errors = comm.allgather(f"rank {r}: wrong sum in parameter(s) {bad}" if bad else None)
    problems = [e for e in errors if e]
    return "; ".join(problems) if problems else None


def comm_auto(comm, gpus: int) -> tuple[str, str]:
    """Collective: the data path ``--comm auto`` takes here (nccl where NCCL admits these
    ranks on their GPUs, else mpi), and why."""
    import torch

    from disdl_mpi.comm.torch_group import resolve_comm

    return resolve_comm("auto", torch.device("cuda" if gpus else "cpu"), comm)


def verdict(f: dict[str, Any], test: Optional[str], tested: bool) -> tuple[bool, str]:
    launched = f.get("launcher_size")
    if launched and launched > f["world_size"]:
        # Seen on a GPU image: the system's mpiexec (one MPI) started a Python whose mpi4py
        # loaded another, and every process ran alone as rank 0 of 1, silently.
        return False, (
            f"NO: the launcher started {launched} ranks but MPI sees a world of "
            f"{f['world_size']}: the mpiexec used belongs to another MPI library "
            f"than the one mpi4py loaded ({f['mpi_library']})"
        )
    if test:
        return False, f"NO: the allreduce self-test failed ({test})"
    if f["cuda_available"]:
        path = "CUDA, CUDA-aware MPI" if f["cuda_aware"] else "CUDA, host-staged allreduce"
        path += f"; --comm auto: {f['comm_auto']} ({f['comm_auto_reason']})"
    else:
        path = "CPU"
    scope = (
        f"self-test passed on {f['world_size']} ranks"
        if tested
        else "single process: run under mpiexec -n 2 for the allreduce self-test"
    )
    return True, f"YES: this installation can run disdl-mpi ({path}; {scope})"


def main(argv: Optional[list[str]] = None) -> int:
    p = program_parser("python -m disdl_mpi.doctor", __doc__)
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write the facts here")
    args = p.parse_args(argv)
    from disdl_mpi.comm.world import install_abort_handler, rank_info, world
    from disdl_mpi.files import write_json

    comm = world()
    install_abort_handler(comm)
    info = rank_info(comm)
    f = facts(comm)
    f["nodes"], f["ranks_per_node"] = info.nodes, info.local_size
    f["launcher_size"] = launcher_size()
    tested = comm.Get_size() > 1
    test = None
    if tested:
        device = f"cuda:{info.local_rank % f['gpus']}" if f["gpus"] else "cpu"
        test = self_test(comm, device)
        if f["gpus"]:
            import torch

            torch.cuda.set_device(device)
    f["comm_auto"], f["comm_auto_reason"] = comm_auto(comm, f["gpus"])
    ok, line = verdict(f, test, tested)
    f["self_test"] = "passed" if tested and not test else (test or "not run (1 rank)")
    f["verdict"] = line
    if comm.Get_rank() == 0:
        width = max(len(k) for k in f)
        for k, v in f.items():
            if k != "verdict":
                print(f"{k:<{width}}  {v}")
        print(line, flush=True)
        if args.json_path:
            write_json(args.json_path, f)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
